"""What the bench scripts share: the machine and its load, percentiles, the tables they print, the
chat questions of the concurrency sweeps, and the GPT-2 pair.

Each bench runs as a script (``python bench/<name>.py``), which puts this
folder on ``sys.path``; the repository root is added here for ``core``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load_average() -> str:
    """The 1, 5 and 15-minute load averages, printed beside every figure taken on a shared machine."""
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), which the figures depend on as much as on the core count."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def bench_device(parser, name: str) -> torch.device:
    """``--device NAME`` as the jobs resolve it (core.device); one this machine lacks ends the bench
    at once with the flag named, before any model is built or server started."""
    from core.device import resolve_device

    try:
        return resolve_device(name)
    except ValueError as err:
        parser.error(str(err))


def describe_device(device: torch.device) -> str:
    """What the figures were measured on: the GPU's name and memory, or the CPU count."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"GPU figures: {props.name}, {props.total_memory / 2**30:.0f} GiB, torch CUDA {torch.version.cuda}"
    return f"CPU: {cpu_model()}, {os.cpu_count()} cores"


def synchronized(clock, device: torch.device):
    """``clock``, waiting first for the GPU's queued work, so a reading covers what was launched before it."""
    if device.type != "cuda":
        return clock

    def read() -> float:
        torch.cuda.synchronize(device)
        return clock()

    return read


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) with linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


# Each request of a concurrency sweep asks its own question (no two alike, so a prefix cache can
# share only the chat template's preamble), and asks for a story, so that no answer ends early.
TOPICS = [
    "a lighthouse keeper", "the first train across a desert", "a cat that learned to swim", "a city under ice",
    "bread baking at dawn", "a violin maker", "the last bookshop in town", "a storm at sea", "a garden on the moon",
    "an old clock tower", "a child's first kite", "a mountain rescue", "a market in the rain", "a forgotten letter",
    "the deepest cave", "a robot that paints", "a river ferry", "a winter festival", "a lost dog finding home",
    "a beekeeper's year", "a night at the observatory", "a shipwreck diver", "a village without roads",
    "the coldest morning", "a circus leaving town", "a chess match in the park", "a map with a missing island",
    "a desert well", "a tailor's shop", "a race across the ice", "a quiet library", "an orchard in autumn",
]


def story_question(i: int) -> str:
    """The ``i``-th request's user message."""
    topic = TOPICS[i % len(TOPICS)] + (f" (take {i // len(TOPICS) + 1})" if i >= len(TOPICS) else "")
    return f"Tell me a long story about {topic}."


def print_table(rows: list[list] | list[tuple]) -> None:
    """A Markdown table; the first row is the header."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for n, row in enumerate(cells):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def gpt2_pair(seed: int = 0, **hf_config) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, transformers') GPT-2 124M with the same random weights: transformers' own
    initialisation, seeded, converted with our Hugging Face loader. ``hf_config`` overrides
    ``GPT2Config`` fields (dropout, for training)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from core.weights.hf import convert_gpt2_state_dict, gpt2_config_from_hf
    from core.model import GPTModel

    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(**hf_config))
    cfg = gpt2_config_from_hf(hf.config.to_dict())
    ours = GPTModel(cfg)
    ours.load_state_dict(convert_gpt2_state_dict(hf.state_dict(), cfg))
    return ours, hf
