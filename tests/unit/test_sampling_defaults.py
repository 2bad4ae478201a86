"""The model's sampling defaults read off generation_config.json, and fitting max_tokens."""

import json

from vllm_runner.engine.sampling_defaults import read_sampling_defaults


def test_a_model_folder_without_a_generation_config_has_no_defaults(tmp_path):
    """(Only a folder that generation_config names must have the file.)"""
    assert read_sampling_defaults(str(tmp_path), "auto") == {}


def test_defaults_are_held_as_sampling_params_holds_them(tmp_path):
    config = {"top_k": -1, "max_new_tokens": 7, "temperature": 1.0, "min_p": None}
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    assert read_sampling_defaults(str(tmp_path), "auto") == {"top_k": 0, "max_tokens": 7}
    assert read_sampling_defaults(str(tmp_path), "vllm") == {}


def test_a_missing_max_tokens_is_the_models_capped_by_the_room_left():
    """min(model's max_new_tokens, room left); a client's min_tokens above that wins if it
    fits; a set max_tokens, no model default or no room: the params as they are."""
    from vllm_runner.engine.sampling_defaults import fit_max_tokens
    from vllm_runner.sampling_params import SamplingParams

    def fit(prompt_len: int, cap: int | None = 5, **fields) -> int | None:
        params = SamplingParams(**({"max_tokens": None} | fields))
        defaults = {} if cap is None else {"max_tokens": cap}
        return fit_max_tokens(params, defaults, prompt_len, 64).max_tokens

    assert fit(10) == 5
    assert fit(61) == 3
    assert fit(10, min_tokens=8) == 8
    assert fit(60, min_tokens=8) is None  # past the room: refused later, naming it
    assert fit(10, max_tokens=9) == 9
    assert fit(10, cap=None) is None
    assert fit(64) is None
