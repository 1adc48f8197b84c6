"""Our C++ CPU kernels (``core/fast/csrc``), compiled on first use and cached.

Some serving arithmetic has no good torch CPU kernel: products straight from
GGUF's quantized blocks (``core.fast.gguf_matvec``), decoding's few-row products at
memory speed (``core.fast.panels``), a whole GPT-2 layer of a decoding step
(``core.fast.fused_layers``), and the RMSNorm and rotary embedding of a one-token
decoding step in one call each (``core.fast.fused_ops``). Each is one C++ file
(sharing headers beside it) that ``torch.utils.cpp_extension`` compiles with the
machine's compiler the first time it is asked for (once per machine), into
``$SCRATCHGPT_HOME/extensions/torch-<version>/`` (see :func:`extensions_dir`),
where later processes find it. :func:`load_kernels` raises :class:`FastPathError` saying why when it
cannot (no AVX-512, no compiler); callers then keep torch's own kernels.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from core.paths import cache_dir

logger = logging.getLogger(__name__)
SOURCES = Path(__file__).with_name("csrc")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mf16c", "-mfma", "-fopenmp"]


class FastPathError(RuntimeError):
    """A fast-path transform or kernel that cannot apply to this model, device, dtype or machine."""


# What every fast path checks before handing a product to a kernel, and the key of the
# kernel-side copy of a weight (panels, GGUF blocks, packed layouts) it must still match.
def weight_key(weight: torch.Tensor) -> tuple:
    # Changes when the weight is modified in place (version), replaced or cast. Tensors
    # made under inference_mode keep no version counter; they are taken as unchanged.
    version = 0 if weight.is_inference() else weight._version
    return (weight.data_ptr(), version, weight.dtype, weight.shape)


def needs_autograd(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a product of ``x`` and ``weight`` must be recorded for backward: the
    fast paths' kernels have none, so such calls take torch's own code."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def extensions_dir() -> Path:
    """``$SCRATCHGPT_HOME/extensions/torch-<version>``, or under ``$TORCH_EXTENSIONS_DIR`` (torch's own
    variable) when that is set: processes with homes of their own can then share one build."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return (Path(root) if root else cache_dir() / "extensions") / f"torch-{torch.__version__.replace('+', '-')}"


def load_kernels(name: str):
    """The compiled module of ``core/fast/csrc/<name>.cpp``, built on first use; FastPathError says why not."""
    module, why_not = _build(name)
    if module is None:
        raise FastPathError(why_not)
    return module


@functools.cache  # a failure is remembered too: a build that failed once is not retried for every layer
def _build(name: str) -> tuple[object | None, str]:
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        return None, f"our CPU kernels need AVX-512; this CPU offers {torch.backends.cpu.get_cpu_capability()}"
    # torch builds with ninja: pip's ninja lives beside this interpreter, which may not be on PATH.
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    if shutil.which("ninja") is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        return None, "our CPU kernels are compiled on first use and need a C++ compiler and ninja on PATH"
    from torch.utils.cpp_extension import load  # here: importing it is slow, and most runs never build

    build = extensions_dir() / name
    build.mkdir(parents=True, exist_ok=True)
    if not any(build.glob("*.so")):
        logger.info("compiling core/fast/csrc/%s.cpp into %s (once per machine, about 30 s)", name, build)
    try:
        return load(f"scratchgpt_{name}", [str(SOURCES / f"{name}.cpp")], extra_cflags=FLAGS,
                    extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False), ""
    except (RuntimeError, OSError, ImportError) as err:  # a failed compile or link, or a stale library
        lines = str(err).strip().splitlines() or [type(err).__name__]
        return None, f"core/fast/csrc/{name}.cpp did not build: {lines[-1]}"
