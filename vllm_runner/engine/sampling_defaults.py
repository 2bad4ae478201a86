"""The model's sampling defaults: the sampling fields of its generation_config.json, used
where a request sets none (vLLM's ``generation_config="auto"``). Read once at start-up."""

import dataclasses
import json
import logging
import os
from collections.abc import Mapping

from vllm_runner.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
# the model's defaults / the engine's built-in ones; anything else names a folder whose
# generation_config.json holds the defaults (as vLLM's generation_config=<folder>)
GENERATION_CONFIGS = ("auto", "vllm")
# generation_config.json's name -> SamplingParams' (do_sample is not read, as in vLLM: a
# temperature of its own says whether a model samples)
FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}
# transformers' own GenerationConfig defaults: a file's value equal to one of these is not a
# default of the model's (vLLM reads the file's difference from them: a top_k of 50 written
# out by a save is not applied there either)
TRANSFORMERS_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}


def generation_folder(path: str, generation_config: str) -> str:
    """Where the generation_config.json is read from (sampling defaults, EOS ids): the model
    folder ``path``, or the folder ``generation_config`` names (as vLLM: both from it)."""
    return path if generation_config in GENERATION_CONFIGS else generation_config


def read_sampling_defaults(path: str, generation_config: str) -> dict[str, object]:
    """The SamplingParams fields the model folder ``path`` sets in its generation_config.json
    (``generation_config="vllm"``, or no file: none), or those of the folder
    ``generation_config`` names, whose file must exist. A value SamplingParams refuses stops
    start-up naming the file, the field and the limit: each request would fail on it."""
    if generation_config == "vllm":
        return {}
    folder = generation_folder(path, generation_config)
    file = os.path.join(folder, "generation_config.json")
    if not os.path.exists(file):
        if folder == path:
            return {}
        raise ValueError(
            f"generation_config={generation_config!r} names a folder without a "
            f"generation_config.json ({file} does not exist); 'auto' reads the model's, "
            "'vllm' uses the engine's own defaults"
        )
    try:
        with open(file) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the model's sampling defaults in {file}: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(config).__name__}")
    defaults: dict[str, object] = {}
    for key, name in FIELDS.items():
        value = config.get(key)
        if value is None or (key in TRANSFORMERS_DEFAULTS and value == TRANSFORMERS_DEFAULTS[key]):
            continue
        try:  # (as SamplingParams holds it: top_k -1 is 0)
            defaults[name] = getattr(SamplingParams(**{name: value}), name)
        except ValueError as e:
            raise ValueError(
                f"{file} sets {key}={value!r}, which cannot be a sampling default: {e}; fix "
                "the file, or pass generation_config='vllm' to use the engine's own defaults"
            ) from None
    if defaults:
        logger.info(
            "sampling defaults from %s: %s (a request's own settings win; "
            "generation_config='vllm' turns them off)",
            file,
            ", ".join(f"{k}={v}" for k, v in defaults.items()),
        )
    return defaults


def fit_max_tokens(
    params: SamplingParams, defaults: Mapping[str, object], prompt_len: int, max_model_len: int
) -> SamplingParams:
    """``params`` of a request with no max_tokens (up to max_model_len), capped by the
    model's default max_tokens (generation_config.json's max_new_tokens) if it has one, as
    vLLM's server: the smaller of the two, so such a request is never refused for it. A
    client's min_tokens above that cap wins over it. A prompt that leaves no room: as it is
    (refused naming the prompt's length)."""
    cap = defaults.get("max_tokens")
    room = max_model_len - prompt_len
    if params.max_tokens is not None or cap is None or room < 1:
        return params
    max_tokens = max(min(cap, room), params.min_tokens)
    return params if max_tokens > room else dataclasses.replace(params, max_tokens=max_tokens)
