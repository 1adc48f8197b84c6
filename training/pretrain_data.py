"""Pretraining data: text or token files into train/validation windows, and a resumable sampler.

Text follows the book's chapter 5: each document is split by characters
(the first ``1 - val_fraction`` trains, the rest validates), tokenized, and
cut into windows of ``context_length`` tokens every ``stride`` tokens with
targets shifted by one (``core.data.SlidingWindowDataset``). Several documents
are joined with the end-of-text token between them, as GPT-2 did.

Token files made by ``scratchgpt prepare`` (``core.data.TokenFile``) are
memory-mapped instead of held in memory.

``WindowSampler`` replaces a shuffling DataLoader: its order is a function of
(seed, epoch) only and its position is two integers, so a resumed run draws
exactly the batches the uninterrupted run would have drawn. Under DDP each
rank takes every world_size-th window of the epoch's order.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.data import HEADER_SUFFIX, DataError, SlidingWindowDataset, TokenFile, TokenFileDataset

TEXT_SUFFIXES = (".txt", ".md", ".text")


def expand_inputs(paths: list[Path] | tuple[Path, ...], flag: str = "--data") -> list[Path]:
    """Files named by ``paths``: globs expanded, directories to their text files (sorted)."""
    out: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if any(c in str(p) for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(p)))
            if not matches:
                raise DataError(f"{flag} {p}: the pattern matches no file")
            out.extend(m for m in matches if m.is_file())
        elif p.is_dir():
            if (p / "train.bin").is_file():
                out.append(p)  # a `scratchgpt prepare` output directory
                continue
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in TEXT_SUFFIXES)
            if not files:
                raise DataError(f"{flag} {p}: the directory has no {'/'.join(TEXT_SUFFIXES)} files")
            out.extend(files)
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{flag} {p}: no such file or directory")
    if not out:
        raise DataError(f"{flag}: no input files given")
    return out


def is_token_file(path: Path) -> bool:
    return path.is_file() and path.with_name(path.name + HEADER_SUFFIX).is_file()


def read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); convert it or pass a token file from `scratchgpt prepare`") from None
    if not text.strip():
        raise DataError(f"{path} is empty: there is nothing to train on")
    return text


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """The book's split: the first (1 - val_fraction) of the characters train, the rest validate."""
    cut = int((1.0 - val_fraction) * len(text))
    return text[:cut], text[cut:]


def encode_documents(docs: list[str], tokenizer) -> np.ndarray:
    """Token ids of the documents with the end-of-text token between them."""
    ids: list[int] = []
    for i, doc in enumerate(docs):
        if i and tokenizer.eos_id is not None:
            ids.append(tokenizer.eos_id)
        ids.extend(tokenizer.encode(doc))
    return np.asarray(ids, dtype=np.int64)


@dataclass
class Corpus:
    train: np.ndarray  # token ids (in memory, or a read-only memmap)
    val: np.ndarray
    description: str


def _token_file(path: Path, tokenizer_name: str) -> np.ndarray:
    tf = TokenFile(path)
    if len(tf) == 0:
        raise DataError(f"{path} holds no tokens: there is nothing to train on")
    declared = tf.header.get("tokenizer")
    if isinstance(declared, dict):
        declared = declared.get("name") or declared.get("type")
    if declared is not None and declared != tokenizer_name:
        raise DataError(f"{path} was tokenized with {declared!r}, but this job uses {tokenizer_name!r}; re-run `scratchgpt prepare`")
    return tf.ids


def load_corpus(
    data: list[Path], val_data: list[Path] | None, val_fraction: float, tokenizer, tokenizer_name: str = "gpt2"
) -> Corpus:
    """Train and validation token ids from ``--data`` (and ``--val-data`` when given)."""
    inputs = expand_inputs(data, "--data")
    if len(inputs) == 1 and inputs[0].is_dir():  # prepare output: train.bin + val.bin
        d = inputs[0]
        train = _token_file(d / "train.bin", tokenizer_name)
        val = _token_file(d / "val.bin", tokenizer_name) if (d / "val.bin").is_file() else np.zeros(0, np.int64)
        if val_data:
            val = load_ids(val_data, tokenizer, tokenizer_name, "--val-data")
        return Corpus(train, val, f"token files in {d}: {len(train):,} train / {len(val):,} val tokens")
    if all(is_token_file(p) for p in inputs):
        if len(inputs) > 1:
            raise DataError("--data: give one token file (or the directory `scratchgpt prepare` wrote), not several")
        ids = _token_file(inputs[0], tokenizer_name)
        if val_data:
            return Corpus(ids, load_ids(val_data, tokenizer, tokenizer_name, "--val-data"), f"token file {inputs[0]}")
        cut = int((1.0 - val_fraction) * len(ids))
        return Corpus(ids[:cut], ids[cut:], f"token file {inputs[0]}, split {1 - val_fraction:.0%}/{val_fraction:.0%}")
    if any(is_token_file(p) for p in inputs):
        raise DataError("--data mixes token files and text files; give one kind")
    texts = [read_text(p) for p in inputs]
    if val_data:
        train_docs, val_docs = texts, None
    else:
        pairs = [split_text(t, val_fraction) for t in texts]
        train_docs, val_docs = [a for a, _ in pairs], [b for _, b in pairs if b]
    train = encode_documents(train_docs, tokenizer)
    val = load_ids(val_data, tokenizer, tokenizer_name, "--val-data") if val_data else encode_documents(val_docs or [], tokenizer)
    names = ", ".join(p.name for p in inputs[:4]) + (f" (+{len(inputs) - 4} more)" if len(inputs) > 4 else "")
    return Corpus(train, val, f"{len(inputs)} text file(s) [{names}]: {len(train):,} train / {len(val):,} val tokens")


def load_ids(paths: list[Path], tokenizer, tokenizer_name: str, flag: str) -> np.ndarray:
    inputs = expand_inputs(paths, flag)
    if all(is_token_file(p) for p in inputs) and len(inputs) == 1:
        return _token_file(inputs[0], tokenizer_name)
    return encode_documents([read_text(p) for p in inputs], tokenizer)


@dataclass
class _IdsView:
    """The two attributes TokenFileDataset reads from a TokenFile, for a slice of one."""

    ids: np.ndarray
    path: str


def make_dataset(ids: np.ndarray, context_length: int, stride: int, what: str) -> SlidingWindowDataset:
    """Windows over ``ids``; a DataError naming ``what`` when there is not one full window."""
    if len(ids) <= context_length:
        raise DataError(
            f"the {what} has {len(ids)} tokens, fewer than one window of --context-length {context_length} + 1: "
            "give more text, a smaller --context-length, or a smaller --val-fraction"
        )
    if isinstance(ids, np.memmap):
        # Keep token files on disk: TokenFileDataset reads windows lazily.
        return TokenFileDataset(_IdsView(ids, what), context_length, stride)
    return SlidingWindowDataset(ids, context_length, stride, source=what)


def collate(dataset: SlidingWindowDataset, indices: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [dataset[int(i)] for i in indices]
    return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])


class WindowSampler:
    """Batches of window indices in a seeded per-epoch order, with a resumable position.

    Each epoch's order is ``randperm(n)`` from a generator seeded with
    ``seed + epoch`` (or 0..n-1 without shuffling). Rank r of W takes
    positions r, r+W, r+2W... of that order, trimmed so all ranks get the same
    number of full batches (the remainder is dropped, as ``drop_last`` does).
    """

    def __init__(self, n_windows: int, batch_size: int, *, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        self.n = n_windows
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = (n_windows // world_size) // batch_size
        if self.batches_per_epoch < 1:
            raise DataError(
                f"the training data has {n_windows} windows, fewer than one batch of {batch_size}"
                + (f" per rank on {world_size} ranks" if world_size > 1 else "")
                + ": give more text or lower --batch-size"
            )
        self.epoch = 0
        self.pos = 0  # next batch within the epoch
        self._order: torch.Tensor | None = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + self.epoch)
                order = torch.randperm(self.n, generator=g)
            else:
                order = torch.arange(self.n)
            self._order = order[self.rank :: self.world_size][: self.batches_per_epoch * self.batch_size]
        return self._order

    def next_batch(self) -> torch.Tensor:
        if self.pos >= self.batches_per_epoch:
            self.epoch += 1
            self.pos = 0
            self._order = None
        order = self._epoch_order()
        batch = order[self.pos * self.batch_size : (self.pos + 1) * self.batch_size]
        self.pos += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = None
