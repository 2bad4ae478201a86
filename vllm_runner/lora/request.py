"""LoRARequest: which adapter a request runs with (vLLM's class, field names kept)."""

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """A PEFT adapter folder to run a request with. ``lora_int_id`` identifies the adapter
    in the engine (its CPU cache, its device slot, its prefix-cache blocks): give each
    adapter its own, from 1 up (0 is the base model, as in vLLM)."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None  # (shown as the adapter's parent in /v1/models)

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        lora_id = self.lora_int_id
        if not isinstance(lora_id, int) or isinstance(lora_id, bool) or lora_id < 1:
            raise ValueError(f"lora_int_id must be an integer >= 1 (0 is the base model), "
                             f"got {lora_id!r}")  # fmt: skip
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(
                f"lora_path of LoRA adapter {self.lora_name!r} must name its PEFT folder, got "
                f"{self.lora_path!r}"
            )

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    def hash_root(self) -> bytes:
        """What the prefix cache's first block hash of a request starts from: the same
        tokens under two adapters (or the base model: no root) are different KV."""
        return f"lora\0{self.lora_int_id}\0{self.lora_name}\0{self.lora_path}".encode()


def lora_requests(
    lora_request: LoRARequest | Sequence[LoRARequest | None] | None, num_prompts: int
) -> list[LoRARequest | None]:
    """One adapter (or None) per prompt, as vLLM's ``lora_request``: one for every prompt,
    or a list of one per prompt."""
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * num_prompts
    if not isinstance(lora_request, list | tuple):
        raise ValueError(f"lora_request must be a LoRARequest or a list of them (one per "
                         f"prompt), got {type(lora_request).__name__}")  # fmt: skip
    if len(lora_request) != num_prompts:
        raise ValueError(f"got {len(lora_request)} lora_requests for {num_prompts} prompts")
    return list(lora_request)
