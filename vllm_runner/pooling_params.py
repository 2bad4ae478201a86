"""Embedding settings, with vLLM's names: ``PoolerConfig`` (per engine: how final hidden
states become one vector) and ``PoolingParams`` (per request)."""

import dataclasses
import json
from dataclasses import dataclass, field

# "LAST": the last prompt token's final (normed) hidden state, vLLM's default for decoder
# models used as embedders (Qwen3-Embedding, e5-mistral); "MEAN": the mean over every prompt
# token; "CLS": the first token's.
POOLING_TYPES = ("LAST", "MEAN", "CLS")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class PoolerConfig:
    """How an engine pools its embedding requests (EngineArgs ``pooler_config``, as vLLM's:
    a PoolerConfig, a dict of its fields, or their JSON text). ``normalize``: the vector is
    L2-normalised (a request's ``PoolingParams.normalize`` overrides it)."""

    pooling_type: str = "LAST"
    normalize: bool = True

    def __post_init__(self) -> None:
        kind = self.pooling_type
        if not isinstance(kind, str) or kind.upper() not in POOLING_TYPES:
            raise ValueError(f"pooler_config pooling_type must be one of {POOLING_TYPES} "
                             f"(any case), got {kind!r}")  # fmt: skip
        object.__setattr__(self, "pooling_type", kind.upper())
        if not isinstance(self.normalize, bool):
            raise ValueError(f"pooler_config normalize must be true or false, got "
                             f"{self.normalize!r}")  # fmt: skip

    @classmethod
    def of(cls, value: "PoolerConfig | dict | str | None") -> "PoolerConfig":
        """``value`` as a PoolerConfig (None: the defaults)."""
        if value is None or isinstance(value, PoolerConfig):
            return value or cls()
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"pooler_config is not valid JSON ({e}), got {value!r}") from None
        if not isinstance(value, dict):
            raise ValueError(f"pooler_config must be a PoolerConfig, a dict or its JSON text, "
                             f"got {value!r}")  # fmt: skip
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(value) - known))
        if unknown:
            raise ValueError(f"pooler_config key(s) {unknown} are not supported; known: "
                             f"{sorted(known)}")  # fmt: skip
        return cls(**value)


@dataclass
class PoolingParams:
    """One embedding request's settings (vLLM's PoolingParams); validated on construction.

    ``dimensions``: the vector's length; only the model's hidden size is taken (no model
    here is trained for shorter, matryoshka, vectors). ``normalize``: L2-normalise (None:
    the engine's ``pooler_config``). ``truncate_prompt_tokens``: embed the prompt's last k
    tokens (-1: max_model_len), as SamplingParams'."""

    dimensions: int | None = None
    normalize: bool | None = None
    truncate_prompt_tokens: int | None = None
    # Filled by the engine (not user settings): its pooler_config's pooling type.
    pooling_type: str = field(default="LAST", repr=False, init=False)

    def __post_init__(self) -> None:
        if self.dimensions is not None and (not _is_int(self.dimensions) or self.dimensions < 1):
            raise ValueError(f"dimensions must be an integer >= 1, got {self.dimensions!r}")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true, false or None, got {self.normalize!r}")
        k = self.truncate_prompt_tokens
        if k is not None and (not _is_int(k) or (k < 1 and k != -1)):
            raise ValueError(f"truncate_prompt_tokens must be -1 or an integer >= 1, got {k!r}")

    @property
    def reads_prefix_cache(self) -> bool:
        """Only LAST pooling may skip cached prompt blocks: the last prompt token is always
        computed, while MEAN needs every token's hidden state and CLS the first one's."""
        return self.pooling_type == "LAST"
