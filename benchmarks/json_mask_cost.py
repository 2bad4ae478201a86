"""json_object's host cost per step on the default model's vocabulary (CPU): one row
writing a fixed JSON object token by token, first with an empty mask cache (a step that
meets a new key runs the whole vocabulary from it), then again with the keys cached.

    python -m benchmarks.json_mask_cost
"""

import statistics
import time

import torch

from vllm_runner.model.default_model import default_model_path
from vllm_runner.sample.json_masks import JsonMasks, JsonVocab, apply_json_object
from vllm_runner.sample.rows import SamplingRow
from vllm_runner.sampling_params import SamplingParams
from vllm_runner.tokenizer import load_tokenizer, token_bytes

DOC = '{"name": "Felix", "age": 2, "colors": ["black", {"x": [1.5e3, true, null]}]}'


def main() -> None:
    tok = load_tokenizer(default_model_path())
    width = len(tok)
    start = time.perf_counter()
    masks = JsonMasks(JsonVocab(token_bytes(tok, width)))
    print(f"vocabulary of {width} tokens as bytes: {time.perf_counter() - start:.3f} s")
    params = SamplingParams(temperature=0.0, json_object=True)
    params.all_stop_token_ids = {tok.eos_token_id}
    ids = tok.encode(DOC, add_special_tokens=False)
    for label in ("empty cache", "cached"):
        row = SamplingRow(params, [0], 1, None)
        cold, hit = [], []
        for token in ids:
            keys = len(masks.masks)
            start = time.perf_counter()
            apply_json_object(torch.zeros(1, width), [row], masks)
            (cold if len(masks.masks) > keys else hit).append(time.perf_counter() - start)
            row.token_ids.append(token)
        shown = [f"{name} {statistics.median(t) * 1e3:.2f} ms median of {len(t)} steps"
                 for name, t in (("new key", cold), ("cached key", hit)) if t]  # fmt: skip
        print(f"{label}: " + ", ".join(shown))


if __name__ == "__main__":
    main()
