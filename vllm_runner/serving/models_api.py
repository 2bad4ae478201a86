"""The served models: the base model and its LoRA adapters, which a request picks by its
``model`` field (as vLLM's ``--lora-modules``); /v1/models lists them, and with the
``allow_runtime_lora_updating`` setting POST /v1/load_lora_adapter and
/v1/unload_lora_adapter change the adapters (of this worker: each keeps its own list)."""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from vllm_runner.lora.request import LoRARequest
from vllm_runner.serving import openai_format as fmt

_SHOWN_INPUT = 80  # characters of a requested model name quoted back


def parse_lora_modules(text: str | None) -> list[LoRARequest]:
    """The ``lora_modules`` setting: ``name=path`` entries (separated by commas or spaces,
    as vLLM's ``--lora-modules``), or a JSON list of ``{"name", "path"}`` objects; each
    adapter gets an id from 1 in order."""
    if not text or not text.strip():
        return []
    if text.strip().startswith("["):
        try:
            entries = [(e["name"], e["path"]) for e in json.loads(text)]
        except (ValueError, TypeError, KeyError):
            raise ValueError(f"lora_modules must be a JSON list of {{'name': ..., 'path': ...}} "
                             f"objects, got {text[:_SHOWN_INPUT]!r}") from None  # fmt: skip
    else:
        entries = []
        for item in re.split(r"[\s,]+", text.strip()):
            name, eq, path = item.partition("=")
            if not eq or not name or not path:
                raise ValueError(f"lora_modules entries must be name=path, got {item!r}")
            entries.append((name, path))
    names = [name for name, _ in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"lora_modules names must differ, got {names}")
    for name, path in entries:
        if not os.path.isdir(path):
            raise ValueError(f"lora_modules: adapter {name!r}'s path {path!r} is not a folder")
    return [LoRARequest(name, i, path) for i, (name, path) in enumerate(entries, 1)]


class LoRAEngine:
    """The engine as the requests naming an adapter see it: their streams run the adapter
    and the responses name it as their model (as vLLM's); the rest is the engine's."""

    def __init__(self, engine: Any, lora: LoRARequest) -> None:
        self._engine, self.lora, self.model_name = engine, lora, lora.lora_name

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def validate(self, prompt: Any, params: Any, chat: bool = False, fit: bool = False) -> Any:
        return self._engine.validate(prompt, params, chat, fit, lora_request=self.lora)

    def stream(self, prompt: Any, params: Any = None, request_id: Any = None, *, priority=0):
        return self._engine.stream(
            prompt, params, request_id, priority=priority, lora_request=self.lora
        )

    async def beam_search(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError(f"model {self.model_name!r} is a LoRA adapter: beam search runs on the "
                         f"base model {self._engine.model_name!r} only")  # fmt: skip

    async def embed(self, *args: Any, **kwargs: Any) -> Any:
        raise fmt.OpenAIError(400, f"model {self.model_name!r} is a LoRA adapter: embeddings "
                              f"come from the base model {self._engine.model_name!r}",
                              param="model")  # fmt: skip


class ServedModels:
    def __init__(
        self, get_engine: Callable[[], Any], loras: Sequence[LoRARequest], updates: bool
    ) -> None:
        """``loras``: the adapters served from the start; ``updates``: the load / unload
        routes may change them."""
        self.get_engine, self.updates = get_engine, updates
        self.loras = {lora.lora_name: lora for lora in loras}
        self._ids = itertools.count(max((lo.lora_int_id for lo in loras), default=0) + 1)

    def engine_for(self, requested: str | None, exact: bool = False) -> Any:
        """The engine, if ``requested`` names its model (as vLLM, null or "" name it too,
        unless ``exact``), or its view for an adapter of that name; else a 404."""
        engine = self.get_engine()
        if not (requested or exact) or requested == engine.model_name:
            return engine
        lora = self.loras.get(requested) if isinstance(requested, str) else None
        if lora is not None:
            return LoRAEngine(engine, lora)
        shown = str(requested).encode("utf-8", "backslashreplace").decode()
        if len(shown) > _SHOWN_INPUT:  # (a client's megabyte of name is not sent back)
            shown = shown[:_SHOWN_INPUT] + "..."
        raise fmt.OpenAIError(
            404, f"The model `{shown}` does not exist.", param="model", code="model_not_found"
        )

    def card(self, engine: Any) -> dict[str, Any]:
        card = {"id": engine.model_name, "object": "model", "created": int(time.time()),
                "owned_by": "vllm-runner", "max_model_len": engine.max_model_len}  # fmt: skip
        if isinstance(engine, LoRAEngine):  # (vLLM's: the adapter's folder, its base model)
            card.update(root=engine.lora.lora_path, parent=engine._engine.model_name)
        return card

    def check(self, engine: Any) -> None:
        """The adapters served from the start, checked against the started engine."""
        for lora in self.loras.values():
            engine.inputs.loras.check(lora)


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_int_id: int | None = None


def add_model_routes(app: FastAPI, models: ServedModels) -> None:
    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        engine = models.get_engine()
        views = [engine, *(LoRAEngine(engine, lora) for lora in models.loras.values())]
        return {"object": "list", "data": [models.card(e) for e in views]}

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str) -> dict[str, Any]:
        return models.card(models.engine_for(model, exact=True))

    def check_updates() -> Any:
        if not models.updates:
            raise fmt.OpenAIError(404, "runtime LoRA adapter updates are off: start the server "
                                  "with the setting allow_runtime_lora_updating=true (vLLM's "
                                  "VLLM_ALLOW_RUNTIME_LORA_UPDATING)")  # fmt: skip
        return models.get_engine()

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> PlainTextResponse:
        engine = check_updates()
        name = body.lora_name
        if name in models.loras or name == engine.model_name:
            raise fmt.OpenAIError(400, f"The lora adapter '{name}' has already been loaded.",
                                  param="lora_name")  # fmt: skip
        try:
            lora = LoRARequest(name, next(models._ids), body.lora_path)
            engine.inputs.loras.check(lora)
        except ValueError as exc:
            raise fmt.OpenAIError(400, str(exc), param="lora_path") from None
        models.loras[name] = lora
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        check_updates()
        # NOTE: requests running it finish with it; the engine's copy goes with its LRU
        if models.loras.pop(body.lora_name, None) is None:
            raise fmt.OpenAIError(404, f"The lora adapter '{body.lora_name}' cannot be found.",
                                  param="lora_name")  # fmt: skip
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
