"""Reading, balancing and splitting SMS spam files."""

from pathlib import Path

import pytest

from training.spam_data import SpamDataError, balance, load_spam_splits, read_spam_file, resolve_spam_data, split


def write_spam(path: Path, n_ham: int, n_spam: int) -> Path:
    lines = [f"ham\thello friend number {i}, see you at {i % 12} pm" for i in range(n_ham)]
    lines += [f"spam\tWIN a FREE prize {i}! Call 0800{i:04d} now\tor text STOP" for i in range(n_spam)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reads_labels_text_and_line_numbers(tmp_path):
    path = write_spam(tmp_path / "sms", 3, 2)
    examples = read_spam_file(path)
    assert [e.label for e in examples] == [0, 0, 0, 1, 1]
    assert examples[0].line == 1 and examples[-1].line == 5
    # Only the first tab separates the label; later tabs belong to the message.
    assert examples[-1].text == "WIN a FREE prize 1! Call 08000001 now\tor text STOP"


@pytest.mark.parametrize("bad", ["spamm\tnope", "ham no tab here", "", "ham\t   "])
def test_bad_line_names_file_and_line(tmp_path, bad):
    path = tmp_path / "sms"
    path.write_text(f"ham\tfine\nspam\talso fine\n{bad}\nham\tafter\n", encoding="utf-8")
    with pytest.raises(SpamDataError, match=rf"{path.name}, line 3: expected 'ham' or 'spam'"):
        read_spam_file(path)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "sms"
    path.write_bytes(b"ham\tok\nspam\t\xff\xfe bad\n")
    with pytest.raises(SpamDataError, match="line 2: not valid UTF-8"):
        read_spam_file(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(SpamDataError, match="does not exist"):
        read_spam_file(tmp_path / "nope")
    (tmp_path / "empty").write_text("")
    with pytest.raises(SpamDataError, match="is empty"):
        read_spam_file(tmp_path / "empty")


def test_balance_and_split_are_seeded_and_complete(tmp_path):
    path = write_spam(tmp_path / "sms", 300, 50)
    a, b = load_spam_splits(path), load_spam_splits(path)
    assert [e.line for e in a.train] == [e.line for e in b.train]
    assert (len(a.train), len(a.val), len(a.test)) == (70, 10, 20)
    everything = a.train + a.val + a.test
    assert len({e.line for e in everything}) == 100  # no message in two splits
    assert sum(e.label for e in everything) == 50  # every spam kept, ham undersampled to 50
    other = split(balance(read_spam_file(path), seed=7), seed=7)
    assert [e.line for e in other.train] != [e.line for e in a.train]


def test_balance_needs_both_classes(tmp_path):
    with pytest.raises(SpamDataError, match="no spam messages"):
        balance(read_spam_file(write_spam(tmp_path / "sms", 5, 0)))


def test_empty_split_is_an_error_naming_the_file(tmp_path):
    path = write_spam(tmp_path / "tiny", 4, 4)  # 8 balanced messages: 10% validation is 0
    with pytest.raises(SpamDataError, match=r"tiny: 8 balanced messages leave the val split empty"):
        load_spam_splits(path)


def test_resolve_unpacks_the_uci_zip(tmp_path):
    import zipfile

    src = write_spam(tmp_path / "src", 3, 3)
    with zipfile.ZipFile(tmp_path / "sms.zip", "w") as zf:
        zf.write(src, "SMSSpamCollection")
    path = resolve_spam_data(tmp_path / "sms.zip")
    assert path.name == "SMSSpamCollection" and len(read_spam_file(path)) == 6
    with pytest.raises(SpamDataError, match="does not exist"):
        resolve_spam_data(tmp_path / "missing")


def test_real_collection_splits(shared_data):
    splits = load_spam_splits(shared_data / "sms_spam" / "SMSSpamCollection")
    n = len(splits.train) + len(splits.val) + len(splits.test)
    assert n % 2 == 0 and len(splits.train) == int(n * 0.7)
