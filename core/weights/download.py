"""``scratchgpt download``: a known model, from wherever it can be had, as our checkpoint.

Ties the three steps together: the name is looked up in the catalogue
(``core.weights.catalogue``), the raw files are fetched or taken from a local
copy (``core.weights.fetch``) and converted (``core.weights.convert``).
Everything lands under one cache directory (``core.paths``,
``$SCRATCHGPT_HOME``, default ``~/.cache/scratchgpt``):

```
downloads/            raw files as published (HF checkpoints, GGUF files, datasets)
models/<name>/        our checkpoint directories (core.weights.checkpoint format)
```

OpenAI's original TensorFlow release of GPT-2 (``--from-tf-dir``) skips the
fetch: it is read where it is, and needs the optional TensorFlow dependency.
"""

from __future__ import annotations

from pathlib import Path

from core.model import ModelConfig
from core.paths import models_dir
from core.weights.catalogue import ModelSource, resolve_model_name
from core.weights.convert import convert_to_checkpoint, is_openai_tf_dir, stamp_generation_defaults
from core.weights.fetch import DownloadError, fetch_model
from core.weights.openai_tf import TensorFlowRequiredError, read_hparams


def download_model(
    name: str,
    *,
    size: str | None = None,
    from_dir: str | Path | None = None,
    from_file: str | Path | None = None,
    from_tf_dir: str | Path | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Obtain a known model as our checkpoint directory ``models/<name>/`` (what ``scratchgpt download NAME`` does).

    An existing checkpoint is returned as is unless ``force`` or a local source
    (``from_dir``/``from_file``/``from_tf_dir``) is given; otherwise the raw
    files are fetched (``fetch_model``) and converted (``convert_to_checkpoint``).
    """
    if sum(x is not None for x in (from_dir, from_file, from_tf_dir)) > 1:
        raise DownloadError("pass only one of --from-dir, --from-file and --from-tf-dir")
    source = resolve_model_name(name, size)
    target = models_dir() / source.name
    if from_tf_dir is not None:
        return _from_openai_tf(source, Path(from_tf_dir).expanduser(), target)
    if (target / "config.json").is_file() and not (force or from_dir or from_file):
        stamp_generation_defaults(target, source.name)
        return target
    raw = fetch_model(source.name, from_dir=from_dir, from_file=from_file, progress=progress)
    return convert_to_checkpoint(raw, source.name, target)


def _from_openai_tf(source: ModelSource, directory: Path, target: Path) -> Path:
    """Convert OpenAI's TensorFlow GPT-2 folder, after checking it holds the size asked for."""
    if source.kind != "hf-gpt2":
        raise DownloadError(f"--from-tf-dir reads OpenAI's GPT-2 release; {source.name} is not GPT-2")
    if not directory.is_dir():
        raise DownloadError(f"--from-tf-dir {directory}: no such directory")
    if not is_openai_tf_dir(directory):
        raise DownloadError(f"--from-tf-dir {directory}: expected OpenAI's hparams.json and model.ckpt.* files "
                            "(a Hugging Face folder with config.json goes to --from-dir)")
    # hparams.json first: a wrong size is refused before TensorFlow reads a gigabyte.
    got, want = read_hparams(directory), ModelConfig.from_preset(source.preset)
    if got != want:
        def dims(c: ModelConfig) -> str:
            return f"{c.n_layers} layers, width {c.emb_dim}, {c.n_heads} heads, vocab {c.vocab_size}"

        raise DownloadError(f"--from-tf-dir {directory}: hparams.json describes {dims(got)}, "
                            f"but {source.name} has {dims(want)}; pass the --size the folder holds")
    try:
        return convert_to_checkpoint(directory, source.name, target)
    except TensorFlowRequiredError as err:
        raise TensorFlowRequiredError(f"--from-tf-dir {directory}: {err}") from None
