"""LoRA adapters on the OpenAI routes (in process, CPU, tiny random Llama): a request picks
an adapter by its ``model``; /v1/models lists the adapters with the base model as parent;
/v1/load_lora_adapter and /v1/unload_lora_adapter change them only when allowed; the
``lora_modules`` setting."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi.testclient import TestClient
from lora_testing import write_adapter

from vllm_runner import LLM, AsyncLLM, LoRARequest, SamplingParams
from vllm_runner.serving.models_api import parse_lora_modules
from vllm_runner.serving.openai_api import create_openai_app
from vllm_runner.serving.settings import ServerSettings

PROMPT = [5, 17, 99, 3, 250, 11]
BODY = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 1,
        "return_tokens_as_token_ids": True}  # fmt: skip


@pytest.fixture(scope="module")
def llama(tiny_model_dirs) -> str:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="module")
def adapters(llama, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("loras")
    return {
        "a": write_adapter(str(root / "a"), llama, rank=4, seed=1),
        "b": write_adapter(str(root / "b"), llama, rank=8, seed=2),
        "big": write_adapter(str(root / "big"), llama, rank=32, seed=3),
    }


@pytest.fixture(scope="module")
def engine(llama) -> Any:
    llm = AsyncLLM(llama, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05,
                   engine_process=False, enable_lora=True, max_loras=2)  # fmt: skip
    yield llm
    asyncio.run(llm.shutdown())


def client(engine: Any, adapters: dict, allow: bool) -> TestClient:
    app = create_openai_app(lambda: engine, lora_modules=[LoRARequest("a", 1, adapters["a"])],
                            allow_runtime_lora_updating=allow)  # fmt: skip
    return TestClient(app)


def tokens(response: Any) -> list[int]:
    assert response.status_code == 200, response.text
    names = response.json()["choices"][0]["logprobs"]["tokens"]
    return [int(n.removeprefix("token_id:")) for n in names]


def offline(llama: str, lora: LoRARequest | None) -> list[int]:
    llm = LLM(llama, dtype="float32", device="cpu", num_kv_blocks=32, enable_lora=True)
    params = SamplingParams(max_tokens=6, temperature=0.0)
    return llm.generate([PROMPT], params, lora_request=lora)[0].outputs[0].token_ids


def test_models_lists_each_adapter_with_the_base_model_as_parent(engine, adapters) -> None:
    http = client(engine, adapters, allow=False)
    base, a = http.get("/v1/models").json()["data"]
    assert base["id"] == engine.model_name and "parent" not in base
    assert {k: a[k] for k in ("id", "object", "root", "parent", "max_model_len")} == {
        "id": "a", "object": "model", "root": adapters["a"], "parent": engine.model_name,
        "max_model_len": engine.max_model_len,
    }  # fmt: skip
    assert http.get("/v1/models/a").json()["parent"] == engine.model_name


def test_a_request_runs_the_adapter_its_model_names(engine, adapters, llama) -> None:
    http = client(engine, adapters, allow=False)
    with_a = http.post("/v1/completions", json={**BODY, "model": "a"})
    assert with_a.json()["model"] == "a"
    assert tokens(with_a) == offline(llama, LoRARequest("a", 1, adapters["a"]))
    base = http.post("/v1/completions", json={**BODY, "model": engine.model_name})
    assert tokens(base) == offline(llama, None) != tokens(with_a)
    missing = http.post("/v1/completions", json={**BODY, "model": "nope"})
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "The model `nope` does not exist."


def test_adapters_load_and_unload_at_run_time_when_allowed(engine, adapters, llama) -> None:
    http = client(engine, adapters, allow=True)
    load = {"lora_name": "b", "lora_path": adapters["b"]}
    r = http.post("/v1/load_lora_adapter", json=load)
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'b' added successfully.")
    assert [m["id"] for m in http.get("/v1/models").json()["data"]][1:] == ["a", "b"]
    got = tokens(http.post("/v1/completions", json={**BODY, "model": "b"}))
    assert got == offline(llama, LoRARequest("b", 2, adapters["b"]))
    again = http.post("/v1/load_lora_adapter", json=load)
    assert again.status_code == 400
    assert again.json()["error"]["message"] == "The lora adapter 'b' has already been loaded."
    big = http.post(
        "/v1/load_lora_adapter", json={"lora_name": "big", "lora_path": adapters["big"]}
    )
    assert big.status_code == 400
    assert "has rank 32, more than max_lora_rank 16" in big.json()["error"]["message"]
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "b"})
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'b' removed successfully.")
    assert http.post("/v1/completions", json={**BODY, "model": "b"}).status_code == 404
    gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "b"})
    assert gone.status_code == 404
    assert gone.json()["error"]["message"] == "The lora adapter 'b' cannot be found."


def test_run_time_updates_are_refused_unless_allowed(engine, adapters) -> None:
    http = client(engine, adapters, allow=False)
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        r = http.post(path, json={"lora_name": "b", "lora_path": adapters["b"]})
        assert r.status_code == 404
        assert "allow_runtime_lora_updating=true" in r.json()["error"]["message"]
    assert [m["id"] for m in http.get("/v1/models").json()["data"]][1:] == ["a"]


def test_the_lora_modules_setting(adapters, monkeypatch) -> None:
    a, b = adapters["a"], adapters["b"]
    assert parse_lora_modules(f"a={a}, b={b}") == [LoRARequest("a", 1, a), LoRARequest("b", 2, b)]
    assert parse_lora_modules(f'[{{"name": "b", "path": "{b}"}}]') == [LoRARequest("b", 1, b)]
    with pytest.raises(ValueError, match="lora_modules entries must be name=path, got 'a'"):
        parse_lora_modules("a")
    with pytest.raises(ValueError, match="adapter 'x''s path '/nowhere' is not a folder"):
        parse_lora_modules("x=/nowhere")
    with pytest.raises(ValueError, match="needs enable_lora=true"):
        ServerSettings(lora_modules=f"a={a}")
    settings = ServerSettings.load({"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}, {})
    assert settings.allow_runtime_lora_updating is True
    on = ServerSettings(lora_modules=f"a={a}", enable_lora=True, max_loras=2)
    assert on.engine_kwargs()["enable_lora"] is True and on.lora_requests()[0].lora_name == "a"


def test_beam_search_and_embeddings_with_an_adapter_are_refused(engine, adapters) -> None:
    http = client(engine, adapters, allow=False)
    beams = http.post("/v1/completions", json={**BODY, "model": "a", "use_beam_search": True,
                                               "n": 2, "logprobs": None})  # fmt: skip
    assert beams.status_code == 400
    assert "model 'a' is a LoRA adapter: beam search runs on the base model" in beams.text
    emb = http.post("/v1/embeddings", json={"model": "a", "input": PROMPT})
    assert emb.status_code == 400
    assert "model 'a' is a LoRA adapter: embeddings come from the base model" in emb.text
