"""Fixtures of the engine tests."""

import pytest


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dirs) -> str:
    return tiny_model_dirs["llama"]
