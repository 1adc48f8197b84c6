"""OpenAI's original GPT-2 release (TensorFlow checkpoint) to our state dict.

OpenAI published GPT-2 as ``hparams.json`` plus a TensorFlow 1 checkpoint
(``checkpoint``, ``model.ckpt.index``, ``model.ckpt.data-*``, ``model.ckpt.meta``);
the book's chapter 5 reads it with ``tf.train.load_variable``. Its variables
are named ``model/h{i}/attn/c_attn/w`` and so on, with ``g``/``b`` for a
LayerNorm's gain and bias and 1x1 convolutions of shape ``(1, in, out)``.

Squeezing the leading 1 gives exactly the ``(in, out)`` layout of Hugging
Face's ``Conv1D`` (which was written to load these files), so we rename the
variables to Hugging Face's GPT-2 names and reuse ``core.weights.hf`` for the
transposes and shape checks.

TensorFlow is an optional dependency (``pip install -e '.[tensorflow]'``);
only ``read_tf_variables`` needs it. ``scratchgpt download gpt2 --size 124M
--from-tf-dir DIR`` (``core.weights.download``) is the way in from the command line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from core.model.config import ModelConfig
from core.weights.hf import HFWeightsError, StateDict, convert_gpt2_state_dict


class OpenAIWeightsError(ValueError):
    """An OpenAI GPT-2 checkpoint directory we cannot read or convert."""


class TensorFlowRequiredError(RuntimeError):
    """Reading OpenAI's TensorFlow checkpoint needs the optional tensorflow dependency."""


def config_from_hparams(hparams: Mapping[str, int]) -> ModelConfig:
    """Map ``hparams.json`` (``n_vocab``, ``n_ctx``, ``n_embd``, ``n_head``, ``n_layer``) to our config."""
    try:
        return ModelConfig(
            family="gpt2",
            vocab_size=int(hparams["n_vocab"]),
            context_length=int(hparams["n_ctx"]),
            emb_dim=int(hparams["n_embd"]),
            n_layers=int(hparams["n_layer"]),
            n_heads=int(hparams["n_head"]),
            qkv_bias=True,
            tie_embeddings=True,
            norm_eps=1e-5,
        )
    except KeyError as err:
        raise OpenAIWeightsError(f"hparams.json lacks {err.args[0]!r}") from err


_BLOCK_VAR = re.compile(r"^model/h(\d+)/(ln_1|ln_2|attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)/([gbw])$")
_SUFFIX = {"g": "weight", "b": "bias", "w": "weight"}


def _hf_name(tf_name: str) -> str:
    """``model/h3/attn/c_attn/w`` -> ``h.3.attn.c_attn.weight``; ``model/ln_f/g`` -> ``ln_f.weight``."""
    if tf_name in ("model/wte", "model/wpe"):
        return tf_name.removeprefix("model/") + ".weight"
    if tf_name in ("model/ln_f/g", "model/ln_f/b"):
        return "ln_f." + _SUFFIX[tf_name[-1]]
    m = _BLOCK_VAR.match(tf_name)
    if m is None:
        raise OpenAIWeightsError(f"unexpected variable {tf_name!r} in the OpenAI checkpoint")
    layer, module, kind = m.groups()
    return f"h.{layer}.{module.replace('/', '.')}.{_SUFFIX[kind]}"


def convert_openai_variables(variables: Mapping[str, np.ndarray], cfg: ModelConfig,
                             origin: str | Path = "OpenAI checkpoint") -> StateDict:
    """Our state dict from OpenAI's variables (name -> array), checked against ``cfg``."""
    hf: StateDict = {}
    for name, value in variables.items():
        hf_name = _hf_name(name)
        arr = np.asarray(value, dtype=np.float32)
        if name.endswith("/w"):
            if arr.ndim != 3 or arr.shape[0] != 1:
                raise OpenAIWeightsError(f"{origin}: variable {name} has shape {arr.shape}, expected (1, in, out)")
            arr = arr[0]  # the 1x1 convolution's kernel is a plain (in, out) matrix
        hf[hf_name] = torch.from_numpy(np.ascontiguousarray(arr))
    try:
        return convert_gpt2_state_dict(hf, cfg, origin=origin)
    except HFWeightsError as err:
        raise OpenAIWeightsError(str(err)) from err


def read_tf_variables(ckpt_dir: str | Path) -> dict[str, np.ndarray]:
    """Every variable of the TensorFlow checkpoint in ``ckpt_dir`` as a numpy array."""
    try:
        import tensorflow as tf  # noqa: PLC0415 - optional dependency, imported only here
    except ImportError as err:
        raise TensorFlowRequiredError(
            "reading OpenAI's original GPT-2 checkpoint (model.ckpt.*) needs TensorFlow: "
            "pip install -e '.[tensorflow]' in a scratchgpt checkout (or pip install 'scratchgpt[tensorflow]'). "
            "Alternatively download the same weights from "
            "Hugging Face with `scratchgpt download gpt2 --size 124M`, which needs no TensorFlow."
        ) from err
    ckpt = tf.train.latest_checkpoint(str(ckpt_dir))
    if ckpt is None:
        raise OpenAIWeightsError(f"{ckpt_dir}: no TensorFlow checkpoint (expected 'checkpoint' and model.ckpt.*)")
    return {name: tf.train.load_variable(ckpt, name) for name, _ in tf.train.list_variables(ckpt)}


def read_hparams(ckpt_dir: str | Path) -> ModelConfig:
    """Our config from the ``hparams.json`` of OpenAI's released GPT-2 directory (no TensorFlow needed)."""
    hparams_file = Path(ckpt_dir) / "hparams.json"
    if not hparams_file.is_file():
        raise OpenAIWeightsError(f"{ckpt_dir}: no hparams.json; expected OpenAI's GPT-2 release directory")
    try:
        return config_from_hparams(json.loads(hparams_file.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:  # TypeError: not a JSON object
        raise OpenAIWeightsError(f"{hparams_file}: not the JSON object OpenAI's release holds ({err})") from None


def load_openai_gpt2(ckpt_dir: str | Path) -> tuple[ModelConfig, StateDict]:
    """Read OpenAI's released GPT-2 directory (``hparams.json`` + ``model.ckpt.*``) into our config and state dict."""
    cfg = read_hparams(ckpt_dir)
    return cfg, convert_openai_variables(read_tf_variables(ckpt_dir), cfg, origin=ckpt_dir)
