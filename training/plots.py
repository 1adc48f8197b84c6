"""Training curves as PNG files (the book's chapter 5 ``plot_losses``).

Uses matplotlib's Agg backend, so it works on machines without a display and
never touches the global pyplot state of a caller. Files are written to a
temporary name and renamed, so a reader never sees half a PNG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence


def plot_curves(
    path: str | Path,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    *,
    logy: bool = False,
) -> Path:
    """Plot each ``name: (xs, ys)`` as a line on one axis and save it atomically to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, (xs, ys) in series.items():
        if len(xs) != len(ys):
            raise ValueError(f"series {name!r}: {len(xs)} x values but {len(ys)} y values")
        if not len(xs):
            continue
        # A single point would draw no line; show it as a marker instead.
        ax.plot(list(xs), list(ys), label=name, marker="o" if len(xs) < 30 else None, markersize=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            fig.savefig(f, format="png")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
