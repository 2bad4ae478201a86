"""/generate's failures, before and after its first chunk, and shutdown during loading."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any


def _stream(*items: Any) -> Any:
    """An engine.stream that yields updates with these deltas, raising an exception item."""

    async def stream(*args: Any, **kwargs: Any) -> Any:
        for item in items:
            if isinstance(item, BaseException):
                raise item
            yield SimpleNamespace(delta=item)

    return stream


def test_a_request_failed_before_its_first_chunk_is_a_500_naming_why(
    client: Any, engine: Any, monkeypatch
) -> None:
    from vllm_runner import RequestError

    monkeypatch.setattr(engine, "stream", _stream("", RequestError("request gen-1 failed: x")))
    r = client.post("/generate", json={"prompt": "hi"})
    assert r.status_code == 500 and r.json() == {"error": "request gen-1 failed: x"}
    assert r.headers["content-type"] == "application/json"


def test_a_request_failed_after_its_first_chunk_ends_the_stream(
    client: Any, engine: Any, monkeypatch
) -> None:
    """Headers are sent: the stream ends with the text so far (no error body in it)."""
    from vllm_runner import RequestError

    monkeypatch.setattr(engine, "stream", _stream(" Par", RequestError("request failed: x")))
    r = client.post("/generate", json={"prompt": "hi"})
    assert r.status_code == 200 and r.text == " Par"


def test_shutdown_while_loading_shuts_the_loaded_engine_down(service_module: Any) -> None:
    """Shut down before the model finished loading: the engine it loads is shut down too
    (not left running, its process and memory held)."""
    svc = service_module.LLMService.inner()
    stopped = []

    async def shutdown() -> None:
        stopped.append(True)

    engine = SimpleNamespace(shutdown=shutdown)

    async def load() -> None:
        await asyncio.sleep(0)
        svc.engine = engine

    async def main() -> None:
        svc._loader = asyncio.create_task(load())
        await svc.shutdown()

    asyncio.run(main())
    assert stopped == [True]
