"""Load-testing kit for the vllm-runner service (locust); see run.py."""
