"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import settings

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def scratchgpt_home() -> Path:
    return Path(os.environ.get("SCRATCHGPT_HOME", Path.home() / ".cache" / "scratchgpt"))


# Property tests draw the same examples on every run and machine, so one that fails does so again
# on a rerun and never by chance in CI; no per-example time limit (Hypothesis' default 200 ms is a
# timed assertion, which a busy machine fails). HYPOTHESIS_PROFILE=explore draws new examples.
settings.register_profile("derandomized", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "derandomized"))

# Our C++ kernels compile once per machine into the scratchgpt home (core.fast.kernels). Servers the
# tests start with homes of their own share that one build instead of compiling again each.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(scratchgpt_home() / "extensions"))


# --- The skip guard ------------------------------------------------------------------------------
# A run that lost its Chromium, its SmolLM2 or its data sets would otherwise still be green: every
# such test skips. So a skip is allowed only for what this machine truly lacks, and the guard checks
# the machine again instead of taking the reason's word for it. Under CI (the CI variable set, as CI
# services and .ci/run do) any other skip fails the run; elsewhere the summary lists them.

def _no_kernel_compiler() -> bool:
    return shutil.which("ninja") is None or shutil.which(os.environ.get("CXX", "c++")) is None


def _onednn(dtype: torch.dtype) -> bool:
    from core.fast.transforms import onednn_available

    return onednn_available(dtype)


def _no_postgres() -> bool:
    from postgres import postgres_missing

    return postgres_missing()


# (what the machine lacks, a pattern of the skip reasons it explains, whether it truly lacks it here)
ALLOWED_SKIPS: list[tuple[str, str, Callable[[], bool]]] = [
    ("no CUDA GPU", r"needs a CUDA GPU", lambda: not torch.cuda.is_available()),
    ("a CPU-only test on a CUDA machine", r"this machine has CUDA", torch.cuda.is_available),
    ("torch.compile is opt-in", r"set SCRATCHGPT_TEST_COMPILE=1", lambda: not os.environ.get("SCRATCHGPT_TEST_COMPILE")),
    # core.fast.kernels' FastPathError reasons, raised through tests/kernel_marks.py and the GGUF fixture
    ("no AVX-512 for our C++ kernels", r"our CPU kernels need AVX-512",
     lambda: torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX")),
    ("no C++ compiler or ninja for our kernels", r"need a C\+\+ compiler and ninja", _no_kernel_compiler),
    ("no oneDNN bf16 on this CPU", r"no oneDNN bf16 on this CPU", lambda: not _onednn(torch.bfloat16)),
    ("torch without oneDNN", r"torch built without oneDNN", lambda: not _onednn(torch.float32)),
    # tests/postgres.py's SKIP_REASON: the PostgreSQL half of the database tests
    ("no PostgreSQL server binaries", r"PostgreSQL is not installed here", _no_postgres),
]
_skips: list[tuple[str, str]] = []  # (test or file, reason)


def skip_is_allowed(reason: str) -> bool:
    """Whether ``reason`` names something in ALLOWED_SKIPS that this machine truly lacks."""
    return any(re.search(pattern, reason) and lacks() for _, pattern, lacks in ALLOWED_SKIPS)


def strict_skips() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _record_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    _skips.append((report.nodeid, reason.removeprefix("Skipped: ")))


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _record_skip(report)  # a whole file skipped while importing (pytest.importorskip at module level)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _record_skip(report)


def unexpected_skips() -> list[tuple[str, str]]:
    return [(where, reason) for where, reason in _skips if not skip_is_allowed(reason)]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if strict_skips() and unexpected_skips() and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    unexpected = unexpected_skips()
    if not unexpected:
        return
    verdict = "fail the run (CI is set)" if strict_skips() else "would fail the run under CI=true"
    terminalreporter.section(f"skips this machine does not explain: {len(unexpected)}", red=True, bold=True)
    for where, reason in unexpected:
        terminalreporter.line(f"{where}: {reason}")
    terminalreporter.line(f"These {verdict}. Allowed only for what the machine truly lacks: "
                          + "; ".join(what for what, _, _ in ALLOWED_SKIPS) + ".", red=True)


@pytest.fixture(scope="session", autouse=True)
def built_kernels() -> None:
    """Compile the kernels before the first test: on a fresh machine that takes a few minutes,
    which a server under test would otherwise spend inside its wait for the models to load.
    Where they cannot be built, the tests of the kernels skip and say why."""
    from core.fast.kernels import FastPathError, load_kernels

    for name in ("panel_linear", "decode_layer", "gguf_matvec", "fused_ops"):
        try:
            load_kernels(name)
        except FastPathError:
            pass


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data sets in ../shared/data (only on our machines and in CI)."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file; `.ci/run` obtains it with `scratchgpt download`."""
    candidates = [os.environ.get("SCRATCHGPT_SMOLLM2_GGUF"), scratchgpt_home() / "downloads" / SMOLLM2_GGUF_NAME]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    pytest.skip("SmolLM2 GGUF not found: run `scratchgpt download smollm2-135m-instruct` or set SCRATCHGPT_SMOLLM2_GGUF")


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as our checkpoint: the one `.ci/setup --dev` converted into the
    scratchgpt home, or else converted here from the GGUF file (as `scratchgpt download` does)."""
    converted = scratchgpt_home() / "models" / "smollm2-135m-instruct"
    if (converted / "config.json").is_file():
        return converted
    from core.weights.download import convert_to_checkpoint

    return convert_to_checkpoint(smollm2_gguf, "smollm2-135m-instruct",
                                 tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct")


@pytest.fixture
def tiny_base(tmp_path) -> Path:
    """A tiny random GPT-2-shaped causal LM (2 blocks, 16 wide) saved as a checkpoint: a base for the
    fine-tuning jobs where what is tested is the job, not what it learns."""
    from core.model import GPTModel
    from core.model.config import ModelConfig
    from core.tokenizer.gpt2 import gpt2_tokenizer
    from core.weights.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = GPTModel(ModelConfig(vocab_size=50257, context_length=64, emb_dim=16, n_layers=2, n_heads=2))
    return save_checkpoint(tmp_path / "base", model, gpt2_tokenizer())


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (opt in with ``pytestmark = pytest.mark.usefixtures(...)``).

    Tiny models gain nothing from a second thread, and on a busy two-core machine an OpenMP team
    waiting for a parked core made such tests many times slower (45 ms a step with two, 1 ms with one).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def gguf_chat_checkpoint(tmp_path_factory) -> Path:
    """A tiny GPT-2 chat checkpoint whose weights are Q8_0 numbers, saved with their blocks as a
    GGUF conversion saves them; skips where the GGUF kernels cannot be built."""
    from core.fast.kernels import FastPathError

    try:
        from core.fast.gguf_matvec import kernels

        kernels()
    except FastPathError as err:
        pytest.skip(f"GGUF kernels unavailable: {err}")
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from core.generation.chat_template import ALPACA
    from core.weights.checkpoint import save_checkpoint
    from core.model.config import ModelConfig
    from core.model import GPTModel
    from core.tokenizer.gpt2 import gpt2_tokenizer

    torch.manual_seed(3)
    model = GPTModel(ModelConfig(vocab_size=50257, emb_dim=32, n_layers=2, n_heads=2, context_length=256)).eval()
    blocks = {}
    with torch.no_grad():
        model.head_weight.mul_(20.0)  # peaked logits: greedy answers without near-ties
        linears = {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        for name, weight in {**linears, "tok_emb.weight": model.head_weight}.items():
            raw = quantize(weight.numpy(), GGMLQuantizationType.Q8_0)
            weight.copy_(torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q8_0)))
            blocks[name] = ("Q8_0", torch.from_numpy(np.array(raw)))
    path = tmp_path_factory.mktemp("ckpt") / "gguf-chat"
    return save_checkpoint(path, model, gpt2_tokenizer(), chat_template=ALPACA, metadata={"name": "gguf-chat"},
                           gguf_blocks=blocks)
