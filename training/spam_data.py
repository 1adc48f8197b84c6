"""The SMS Spam Collection, read, balanced and split as in the book's chapter 6.2.

The file (Almeida & Hidalgo, UCI) has one message per line: ``ham`` or
``spam``, a tab, the text; no header. The book undersamples ham to the number
of spam messages with pandas' ``sample(random_state=123)``, shuffles with the
same seed and cuts 70/10/20. pandas draws those samples from
``numpy.random.RandomState(seed).choice``, which we call directly, so on the
same file the split is the book's without depending on pandas.

Nothing here assumes the original 5,574 rows: any file in the format works,
and a split that would come out empty is an error rather than a crash later.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LABELS = ["ham", "spam"]
SEED = 123


class SpamDataError(ValueError):
    """A spam data file that cannot be used (bad line, no spam, a split that would be empty)."""


@dataclass(frozen=True)
class SpamExample:
    label: int  # index into LABELS
    text: str
    line: int  # 1-based line number in the source file, for error messages and audits


@dataclass
class SpamSplits:
    train: list[SpamExample]
    val: list[SpamExample]
    test: list[SpamExample]

    def items(self) -> list[tuple[str, list[SpamExample]]]:
        return [("train", self.train), ("val", self.val), ("test", self.test)]


def read_spam_file(path: str | Path) -> list[SpamExample]:
    """Every line of a UCI-format file; raises SpamDataError naming the file and line of a bad one."""
    path = Path(path)
    if not path.is_file():
        raise SpamDataError(f"spam data file {path} does not exist; pass --data PATH to an SMSSpamCollection file")
    examples = []
    with open(path, "rb") as f:
        raw_lines = f.read().splitlines()
    for number, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SpamDataError(f"{path}, line {number}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        label, tab, text = line.partition("\t")
        if not tab or label not in LABELS or not text.strip():
            shown = line if len(line) <= 60 else line[:57] + "..."
            raise SpamDataError(
                f"{path}, line {number}: expected 'ham' or 'spam', a tab, then the message; got {shown!r}"
            )
        examples.append(SpamExample(LABELS.index(label), text, number))
    if not examples:
        raise SpamDataError(f"spam data file {path} is empty")
    return examples


def balance(examples: list[SpamExample], seed: int = SEED) -> list[SpamExample]:
    """All spam plus as many ham messages drawn at random (the book's create_balanced_dataset)."""
    ham = [e for e in examples if e.label == 0]
    spam = [e for e in examples if e.label == 1]
    if not spam or not ham:
        missing = "spam" if not spam else "ham"
        raise SpamDataError(f"the data has no {missing} messages, so it cannot be balanced")
    # pandas' DataFrame.sample(n, random_state=seed) is RandomState(seed).choice(N, n, replace=False).
    picked = np.random.RandomState(seed).choice(len(ham), size=min(len(spam), len(ham)), replace=False)
    # The book concatenates the ham subset and then every spam message.
    return [ham[i] for i in picked] + spam


def split(
    examples: list[SpamExample], train_frac: float = 0.7, val_frac: float = 0.1, seed: int = SEED, source: str = "data"
) -> SpamSplits:
    """Shuffle (seeded) and cut into train/validation/test (the book's random_split)."""
    order = np.random.RandomState(seed).permutation(len(examples))
    shuffled = [examples[i] for i in order]
    train_end = int(len(shuffled) * train_frac)
    val_end = train_end + int(len(shuffled) * val_frac)
    splits = SpamSplits(shuffled[:train_end], shuffled[train_end:val_end], shuffled[val_end:])
    for name, part in splits.items():
        if not part:
            raise SpamDataError(
                f"{source}: {len(examples)} balanced messages leave the {name} split empty "
                f"(fractions {train_frac}/{val_frac}/{1 - train_frac - val_frac:.2f}); it needs at least "
                f"{int(np.ceil(1 / min(train_frac, val_frac, 1 - train_frac - val_frac)))} messages"
            )
    return splits


def load_spam_splits(path: str | Path, seed: int = SEED) -> SpamSplits:
    """Read, balance and split a spam file: the one entry point the fine-tune and the baseline share."""
    return split(balance(read_spam_file(path), seed), seed=seed, source=str(path))


def resolve_spam_data(data: str | Path | None) -> Path:
    """The SMSSpamCollection file: ``data`` itself (a file or the UCI zip), or the UCI download.

    The download goes through ``core.weights.fetch`` (checksum, resume, offline message)
    and is unpacked next to the zip once.
    """
    if data is None:
        from core.weights.fetch import download_dataset

        data = download_dataset("sms-spam")
    path = Path(data).expanduser()
    if path.is_dir():
        path = path / "SMSSpamCollection"
    if path.suffix == ".zip" and path.is_file():
        target = path.with_name("SMSSpamCollection")
        if not target.is_file():
            try:
                with zipfile.ZipFile(path) as zf:
                    tmp = target.with_name(target.name + ".part")
                    tmp.write_bytes(zf.read("SMSSpamCollection"))
                    tmp.replace(target)
            except (zipfile.BadZipFile, KeyError) as e:
                raise SpamDataError(f"{path} is not the UCI zip holding SMSSpamCollection: {e}") from None
        path = target
    if not path.is_file():
        raise SpamDataError(f"spam data file {path} does not exist; pass --data PATH to an SMSSpamCollection file")
    return path
