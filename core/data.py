"""Turning token streams into training windows (the book's chapter 2.6).

``SlidingWindowDataset`` is the book's GPTDatasetV1: windows of
``max_length`` tokens every ``stride`` tokens, with targets shifted one to
the right, held in memory. For corpora larger than memory, ``scratchgpt
prepare`` writes token files (``TokenFile``): raw uint16 ids on disk plus a
small JSON header, read through ``numpy.memmap`` so only the windows a batch
touches are paged in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class DataError(ValueError):
    """Training data that cannot be used (empty, too short, unreadable)."""


def window_starts(n_tokens: int, max_length: int, stride: int) -> range:
    """Start offsets of every full (input, target) window: each needs max_length + 1 tokens."""
    if max_length < 1 or stride < 1:
        raise DataError(f"max_length and stride must be >= 1 (got {max_length}, {stride})")
    return range(0, max(n_tokens - max_length, 0), stride)


class SlidingWindowDataset(Dataset):
    def __init__(self, token_ids: Sequence[int] | np.ndarray | torch.Tensor, max_length: int, stride: int, source: str = "data") -> None:
        self.tokens = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))
        self.max_length = max_length
        self.starts = window_starts(len(self.tokens), max_length, stride)
        if len(self.starts) == 0:
            raise DataError(
                f"{source} has {len(self.tokens)} tokens, fewer than one window of {max_length} + 1: "
                "use more text or a shorter context length"
            )

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.starts[i]
        chunk = self.tokens[s : s + self.max_length + 1]
        return chunk[:-1], chunk[1:]


def create_dataloader(
    token_ids: Sequence[int] | np.ndarray,
    *,
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    seed: int | None = None,
) -> DataLoader:
    """The book's create_dataloader_v1, taking token ids (tokenize once, outside)."""
    dataset = SlidingWindowDataset(token_ids, max_length, stride)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
        num_workers=num_workers, generator=generator,
    )


# -- token files ---------------------------------------------------------------

HEADER_SUFFIX = ".json"
TOKEN_DTYPE = np.uint16  # GPT-2's 50,257 and SmolLM2's 49,152 ids both fit in 16 bits


def write_token_file(path: str | Path, token_ids: np.ndarray, header: dict[str, Any]) -> Path:
    """Write ids as raw uint16 plus ``<path>.json``; both atomically (temp name, fsync, rename)."""
    path = Path(path)
    ids = np.asarray(token_ids)
    if ids.size and int(ids.max()) > np.iinfo(TOKEN_DTYPE).max:
        raise DataError(f"token id {int(ids.max())} does not fit in uint16; this vocabulary is too large for token files")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(ids.astype(TOKEN_DTYPE).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    meta = {**header, "dtype": "uint16", "tokens": int(ids.size)}
    header_tmp = path.with_name(path.name + HEADER_SUFFIX + ".tmp")
    header_tmp.write_text(json.dumps(meta, indent=2))
    os.replace(header_tmp, path.with_name(path.name + HEADER_SUFFIX))
    return path


class TokenFile:
    """A token file written by ``write_token_file``, memory-mapped."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        header_path = self.path.with_name(self.path.name + HEADER_SUFFIX)
        if not self.path.is_file() or not header_path.is_file():
            raise DataError(f"{self.path} is not a token file made by `scratchgpt prepare` (missing it or its .json header)")
        try:
            self.header = json.loads(header_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{header_path} is corrupt: {e}") from None
        expected = int(self.header.get("tokens", -1)) * np.dtype(TOKEN_DTYPE).itemsize
        if self.path.stat().st_size != expected:
            raise DataError(f"{self.path} has {self.path.stat().st_size} bytes, its header promises {expected}")
        self.ids = np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r") if expected else np.zeros(0, TOKEN_DTYPE)

    def __len__(self) -> int:
        return len(self.ids)


class TokenFileDataset(SlidingWindowDataset):
    """Sliding windows read lazily from a memory-mapped token file."""

    def __init__(self, token_file: TokenFile, max_length: int, stride: int) -> None:
        self.tokens = token_file.ids
        self.max_length = max_length
        self.starts = window_starts(len(self.tokens), max_length, stride)
        if len(self.starts) == 0:
            raise DataError(
                f"{token_file.path} has {len(self.tokens)} tokens, fewer than one window of {max_length} + 1"
            )

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.starts[i]
        chunk = torch.from_numpy(self.tokens[s : s + self.max_length + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]
