"""guided_grammar's host cost on the default model's vocabulary (CPU): a JSON grammar's, an
arithmetic grammar's and a SQL-ish grammar's compile time, then one row writing a fixed
sentence token by token, first with nothing cached (a step that meets a new parser state
works out its transitions and runs the whole vocabulary from it), then with the
states' transitions known but no mask cached (the vocabulary's pass alone), then with the
masks cached. The grammars are ``tests/unit/grammar_samples.py``'s.

    python -m benchmarks.grammar_mask_cost
"""

import statistics
import sys
import time
from pathlib import Path

import torch

from vllm_runner.model.default_model import default_model_path
from vllm_runner.sample.grammar_compile import compile_grammar
from vllm_runner.sample.grammar_masks import GrammarMasks, apply_guided_grammar
from vllm_runner.sample.rows import SamplingRow
from vllm_runner.sample.token_masks import TokenBytes
from vllm_runner.sampling_params import SamplingParams
from vllm_runner.tokenizer import load_tokenizer, token_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "unit"))
from grammar_samples import SAMPLES  # noqa: E402


def main() -> None:
    tok = load_tokenizer(default_model_path())
    width = len(tok)
    vocab = TokenBytes(token_bytes(tok, width))
    for name, (grammar, text) in SAMPLES.items():
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            compiled = compile_grammar(grammar)
            runs.append(time.perf_counter() - start)
        print(f"{name}: {len(grammar)} chars, {len(compiled.alts)} rules, compiled in "
              f"{min(runs) * 1e3:.2f} ms (best of 3)")  # fmt: skip
        masks = GrammarMasks(vocab)
        params = SamplingParams(temperature=0.0, guided_grammar=grammar)
        params.all_stop_token_ids = {tok.eos_token_id}
        ids = tok.encode(text, add_special_tokens=False)
        for label in ("nothing cached", "states known, masks not", "cached"):
            if label.startswith("states"):  # (the parser states' transitions kept)
                masks.masks.clear()
            row = SamplingRow(params, [0], 1, None)
            cold, hit = [], []
            for token in ids:
                made = len(masks.masks)
                start = time.perf_counter()
                apply_guided_grammar(torch.zeros(1, width), [row], masks)
                (cold if len(masks.masks) > made else hit).append(time.perf_counter() - start)
                row.token_ids.append(token)
            assert not row.grammar_cursor.broken, (name, tok.decode(row.token_ids[1:]))
            shown = [f"{kind} {statistics.median(t) * 1e3:.2f} ms median (max "
                     f"{max(t) * 1e3:.1f}) of {len(t)} steps"
                     for kind, t in (("new state", cold), ("cached state", hit)) if t]  # fmt: skip
            print(f"  {label}: " + ", ".join(shown))
        states = masks.grammars[grammar]
        print(f"  {len(ids)} tokens, {len(states.configs)} parser states met")


if __name__ == "__main__":
    main()
