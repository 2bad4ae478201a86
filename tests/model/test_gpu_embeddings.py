"""Embeddings on the GPU path (run on the device machine: pytest -m gpu): decode CUDA graphs,
piecewise graphs, overlapped steps and the pinned copy of pooled vectors."""

import random

import pytest
import torch
import torch.nn.functional as F

from vllm_runner import LLM, PoolingParams, SamplingParams

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from transformers import AutoModelForCausalLM, LlamaConfig

    if not torch.cuda.is_available():
        pytest.fail("the gpu suite needs a CUDA device")
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"])  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # peaked logits: greedy choices are not near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
    path = str(tmp_path_factory.mktemp("embed_gpu"))
    model.save_pretrained(path)
    return path


def batch(num: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4096) for _ in range(rng.randint(2, 300))] for _ in range(num)]


def gpu_llm(path: str, kind: str, **kw) -> LLM:
    return LLM(path, device="cuda", dtype="float32", gpu_memory_utilization=0.3,
               max_num_batched_tokens=256, piecewise_max_tokens=256,
               pooler_config={"pooling_type": kind}, **kw)  # fmt: skip


@pytest.mark.parametrize("kind", ["LAST", "MEAN", "CLS"])
def test_gpu_embeddings_equal_hf_on_the_cpu(model_dir, kind):
    from transformers import AutoModel

    prompts = batch(6, seed=1)
    llm = gpu_llm(model_dir, kind)
    assert llm.engine.overlap and llm.engine.runner.graphs.graphs and llm.engine.runner.pieces
    outs = llm.embed(prompts)
    hf = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    for ids, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            hidden = hf(torch.tensor([ids])).last_hidden_state[0]
        want = {"LAST": hidden[-1], "MEAN": hidden.mean(dim=0), "CLS": hidden[0]}[kind]
        got = torch.tensor(out.outputs.embedding)
        torch.testing.assert_close(got, F.normalize(want, dim=-1), rtol=1e-4, atol=1e-4)
    assert llm.stats()["kv_blocks_used"] == 0


def test_gpu_shared_steps_keep_greedy_tokens_and_vectors(model_dir):
    """Embedding requests join overlapped steps of decoding requests (which replay decode
    graphs between them); tokens and vectors are those of each kind run alone."""
    gen, emb = batch(8, seed=2), batch(8, seed=3)
    alone = gpu_llm(model_dir, "MEAN")
    tokens = [o.token_ids for o in alone.generate(gen, GREEDY)]
    vectors = [torch.tensor(o.outputs.embedding) for o in alone.embed(emb, PoolingParams())]
    llm = gpu_llm(model_dir, "MEAN")
    engine = llm.engine
    gens = [engine.add_request(p, GREEDY) for p in gen[:4]]
    for _ in range(3):  # the first requests decode before the rest arrive
        engine.step(stream=False)
    gens += [engine.add_request(p, GREEDY) for p in gen[4:]]
    embs = [engine.add_request(p, PoolingParams()) for p in emb]
    while engine.has_unfinished():
        engine.step(stream=False)
    engine.pop_finished()
    assert [s.final_output().token_ids for s in gens] == tokens
    for s, want in zip(embs, vectors, strict=True):
        got = torch.tensor(s.final_output().outputs.embedding)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert llm.stats()["kv_blocks_used"] == 0
