"""guided_regex's host cost on the default model's vocabulary (CPU): a JSON-shaped pattern's
and a JSON string's of maxLength 10,000 (a counted repeat) compile time (parse, NFA, DFA),
then one row writing a fixed matching text token by token, first with an empty mask cache (a
step that meets a new DFA state, or count key, runs the whole vocabulary from it), then
again with the masks cached.

    python -m benchmarks.regex_mask_cost
"""

import statistics
import time

import torch

from vllm_runner.model.default_model import default_model_path
from vllm_runner.sample.json_schema import schema_to_regex
from vllm_runner.sample.regex_dfa import compile_regex
from vllm_runner.sample.regex_masks import RegexMasks, apply_guided_regex
from vllm_runner.sample.rows import SamplingRow
from vllm_runner.sample.token_masks import TokenBytes
from vllm_runner.sampling_params import SamplingParams
from vllm_runner.tokenizer import load_tokenizer, token_bytes

# a JSON object of a few typed fields, as a JSON schema's compiled regex would spell it
STRING = r'"([^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4}){0,40}"'
NUMBER = r"-?(0|[1-9][0-9]{0,8})(\.[0-9]{1,6})?"
PATTERN = (
    rf'\{{"name": {STRING}, "age": {NUMBER}, "colors": \[({STRING}(, {STRING}){{0,4}})?\], '
    r'"indoor": (true|false)\}'
)
TEXT = '{"name": "Félix \\"the cat\\"", "age": 2.5, "colors": ["black", "white"], "indoor": true}'
LONG = schema_to_regex({"type": "string", "maxLength": 10_000})
LONG_TEXT = '"' + ('Félix \\"the cat\\" sleeps. ' * 80)[:2000] + '"'  # ~2,000 of its 10,000


def main() -> None:
    tok = load_tokenizer(default_model_path())
    width = len(tok)
    start = time.perf_counter()
    vocab = TokenBytes(token_bytes(tok, width))
    print(f"vocabulary of {width} tokens as bytes: {time.perf_counter() - start:.3f} s")
    for pattern, text in ((PATTERN, TEXT), (LONG, LONG_TEXT)):
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            dfa = compile_regex(pattern)
            runs.append(time.perf_counter() - start)
        print(f"pattern of {len(pattern)} chars: {dfa.num_states} DFA states, compiled in "
              f"{min(runs) * 1e3:.1f} ms (best of 3)")  # fmt: skip
        assert dfa.fullmatch(text)
        masks = RegexMasks(vocab)
        params = SamplingParams(temperature=0.0, guided_regex=pattern)
        params.all_stop_token_ids = {tok.eos_token_id}
        ids = tok.encode(text, add_special_tokens=False)
        for label in ("empty cache", "cached"):
            row = SamplingRow(params, [0], 1, None)
            cold, hit = [], []
            for token in ids:
                made = len(masks.masks)
                start = time.perf_counter()
                apply_guided_regex(torch.zeros(1, width), [row], masks)
                (cold if len(masks.masks) > made else hit).append(time.perf_counter() - start)
                row.token_ids.append(token)
            shown = [f"{name} {statistics.median(t) * 1e3:.2f} ms median of {len(t)} steps"
                     for name, t in (("new mask", cold), ("cached mask", hit)) if t]  # fmt: skip
            print(f"{label}: " + ", ".join(shown))


if __name__ == "__main__":
    main()
