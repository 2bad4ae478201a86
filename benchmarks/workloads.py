"""Workloads, random-weight models and timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

LLAMA_SHAPES = {  # name -> (hidden, layers, heads, kv_heads, intermediate, vocab, tied)
    "1b": (2048, 16, 32, 8, 8192, 128256, True),
    "8b": (4096, 32, 32, 8, 14336, 128256, False),
    "tiny": (256, 2, 4, 2, 512, 1024, True),
}
TEXT = [
    "The history of the printing press begins in the fifteenth century.",
    "Write a short poem about the sea at night.",
    "Explain how a hash table handles collisions, with an example in Python.",
    "What are the main differences between a virus and a bacterium?",
    "Summarize the plot of a story about a lighthouse keeper who finds a map.",
    "List five practical tips for learning a new language as an adult.",
    "Describe the water cycle to a ten-year-old.",
    "Why does the moon always show the same face to the Earth?",
    "Give a recipe for a simple vegetable soup.",
    "Compare trains and planes for a 500 km journey.",
]


@dataclasses.dataclass
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]
    vocab: int

    @property
    def useful_tokens(self) -> int:
        return sum(self.max_tokens)

    def salted(self, salt: int) -> Workload:
        """Same shape, first token shifted by `salt`: repeats never hit the prefix cache."""
        if salt == 0:
            return self
        prompts = [[(p[0] + salt) % self.vocab, *p[1:]] for p in self.prompts]
        return Workload(prompts, self.max_tokens, self.vocab)


def text_workload(model_dir: str, n: int, lo: int, hi: int, seed: int) -> Workload:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        text = " ".join(rng.choice(TEXT) for _ in range(rng.randint(1, 6)))
        msgs = [{"role": "user", "content": text}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)
        prompts.append(list(ids["input_ids"]))
    return Workload(prompts, [rng.randint(lo, hi) for _ in range(n)], len(tok))


def random_workload(n: int, vocab: int, len_lo: int, len_hi: int, new: int, seed: int) -> Workload:
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(len_lo, len_hi))] for _ in range(n)]
    return Workload(prompts, [new] * n, vocab)


def build_random_llama(
    name: str, root: Path, device: str, seed: int, vocab_size: int | None = None
) -> str:
    """Save a random bf16 Llama of the given shape once (safetensors, no tokenizer);
    ``vocab_size`` replaces the shape's (to pair the model with another tokenizer)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    suffix = f"-vocab{vocab_size}" if vocab_size else ""
    folder = root / f"llama-{name}-random-seed{seed}{suffix}"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return str(folder)
    hidden, layers, heads, kv_heads, inter, vocab, tied = LLAMA_SHAPES[name]
    vocab = vocab_size or vocab
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=inter,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=min(128000, vocab - 2),
        eos_token_id=min(128001, vocab - 1),
    )
    torch.manual_seed(seed)
    with torch.device(device):  # random init on the GPU is seconds, on CPU minutes (8B)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name, dir=root))
    model.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(folder)
    del model
    free_memory()
    return str(folder)


def model_vocab(model_dir: str) -> int:
    """The vocabulary size in a model folder's config.json."""
    return json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]


def weight_numel(model_dir: str) -> int:
    """Parameters one decode step reads, from the safetensors headers: all of them but an
    untied input embedding table, of which a step reads one row a token (a tied one is
    stored once and read whole as the LM head)."""
    shapes = {}
    for f in Path(model_dir).glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        shapes.update({k: meta["shape"] for k, meta in header.items() if k != "__metadata__"})
    untied = "lm_head.weight" in shapes
    return sum(
        math.prod(shape)
        for key, shape in shapes.items()
        if not (untied and key.endswith("embed_tokens.weight"))
    )


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def copy_bandwidth(device: str, nbytes: int, iters: int = 10, rounds: int = 3) -> float:
    """Bytes/s of dst.copy_(src), counting bytes read + bytes written: the best of
    ``rounds`` timings of ``iters`` copies (one timing read 10% low at times on an H200,
    which inflates a fraction of the roofline)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    free_memory()
    return 2 * nbytes * iters / best


def timed(
    fn: Callable[[Workload], object], w: Workload, device: str, repeats: int, salt: int = 0
) -> tuple[list[float], object]:
    """Wall times of fn on `repeats` salted copies of w (the last output is returned)."""
    walls, out = [], None
    for r in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn(w.salted(salt + r))
        sync(device)
        walls.append(time.perf_counter() - t0)
    return walls, out
