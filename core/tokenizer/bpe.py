"""Byte-level byte-pair encoding, from scratch.

BPE (Sennrich, Haddow & Birch 2016, "Neural Machine Translation of Rare Words
with Subword Units") starts from single symbols and repeatedly merges the most
frequent adjacent pair. GPT-2 (Radford et al. 2019, section 2.2) runs it on the
UTF-8 *bytes* of the text, so every string is encodable without an unknown
token, and first splits the text with a regular expression (the
"pre-tokenizer") so merges never cross a word/number/punctuation boundary.

Encoding uses *ranks* (token bytes -> id, lower id = merged earlier), the
representation tiktoken uses: within one pre-token piece we repeatedly merge the
adjacent pair whose concatenation has the lowest rank (the leftmost one on a
tie) until no adjacent pair is a token. A piece that is itself a token is
returned as that token directly, as tiktoken does. With GPT-2's ranks this is
byte-for-byte what tiktoken produces.

``BPETokenizer.save``/``load`` read and write ``tokenizer.json`` (``tokenizer_json.py``).
"""

from __future__ import annotations

import functools
import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from core.tokenizer.errors import TokenizerError, TokenizerFileError, TrainingError, UnknownTokenId, UnrepresentableBytes
from core.tokenizer.pretokenizer import PreTokenizer
from core.tokenizer.specials import (
    AllowedSpecial,
    check_disallowed,
    repair_surrogates,
    resolve_allowed,
    special_regex,
    split_on_specials,
)
from core.tokenizer.tokenizer_json import TokenizerJson

# GPT-2's pre-tokenizer as tiktoken writes it (r50k_base). It splits English
# contractions, runs of letters, of digits and of other symbols (each optionally
# led by one space), and whitespace, keeping the last space of a run for the
# next word. The possessive `++` only makes matching faster; `\s++$` and `\s`
# give the same pieces as GPT-2's original `\s+(?!\S)|\s+`.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

ENDOFTEXT = "<|endoftext|>"

UnknownBytes = Literal["error", "drop"]

# Pieces longer than this are merged with a heap (O(n log n)) instead of the
# quadratic scan that is faster on the short pieces natural text is made of.
_HEAP_THRESHOLD = 128
_NO_MERGE = 1 << 62


class _Drifted(Exception):
    """Internal signal: this text needs the Unicode-pinned pre-tokenizer."""


def _is_token(decoder: dict[int, bytes], token_id: object) -> bool:
    try:
        return token_id in decoder
    except TypeError:  # unhashable
        return False


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    ``encoder.json`` and ``vocab.bpe`` store tokens as strings of these
    characters: printable Latin-1 bytes map to themselves and the others (space,
    control bytes, ...) to characters from U+0100 on, so a space reads ``Ġ``.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class BPETokenizer(TokenizerJson):
    """A byte-level BPE tokenizer defined by ranks, a pre-tokenizer regex and special tokens.

    ``unknown_bytes`` says what happens to a byte that has no token (only
    possible when ``ranks`` lacks some of the 256 single bytes, as SmolLM2's
    vocabulary does): ``"error"`` raises ``UnrepresentableBytes``; ``"drop"``
    removes it from its piece before merging, which is what Hugging Face
    ``tokenizers`` and llama.cpp do.
    """

    def __init__(
        self,
        ranks: dict[bytes, int],
        pattern: str = GPT2_PATTERN,
        special_tokens: Mapping[str, int] | None = None,
        name: str = "bpe",
        *,
        eos_id: int | None = None,
        bos_id: int | None = None,
        unknown_bytes: UnknownBytes = "error",
        cache_size: int = 1 << 16,
    ) -> None:
        self.name = name
        self.pattern = pattern
        self.ranks = ranks
        self.special_tokens = dict(special_tokens or {})
        if unknown_bytes not in ("error", "drop"):
            raise ValueError(f"unknown_bytes must be 'error' or 'drop', got {unknown_bytes!r}")
        self.unknown_bytes: UnknownBytes = unknown_bytes

        self._decoder: dict[int, bytes] = {rank: token for token, rank in ranks.items()}
        if len(self._decoder) != len(ranks):
            raise ValueError(f"tokenizer {name!r}: two tokens share one rank")
        for token, token_id in self.special_tokens.items():
            if token_id in self._decoder:
                raise ValueError(
                    f"tokenizer {name!r}: special token {token!r} has id {token_id}, "
                    f"already the rank of {self._decoder[token_id]!r}"
                )
            self._decoder[token_id] = token.encode("utf-8")
        self.vocab_size = max(self._decoder) + 1 if self._decoder else 0

        if eos_id is None:
            eos_id = self.special_tokens.get(ENDOFTEXT)
        for label, value in (("eos_id", eos_id), ("bos_id", bos_id)):
            if value is not None and value not in self._decoder:
                raise ValueError(f"tokenizer {name!r}: {label}={value} is not a token id")
        self.eos_id = eos_id
        self.bos_id = bos_id

        self._pre = PreTokenizer(pattern)
        self._missing = bytes(b for b in range(256) if bytes((b,)) not in ranks)
        # Per-instance LRU over pre-token pieces: natural text repeats a few
        # thousand words, so after warm-up almost every piece is a cache hit.
        self._encode_piece = functools.lru_cache(maxsize=cache_size)(self._encode_piece_uncached)

    def __repr__(self) -> str:
        return f"BPETokenizer(name={self.name!r}, vocab_size={self.vocab_size}, specials={len(self.special_tokens)})"

    # ------------------------------------------------------------------ encode

    def pretokenize(self, text: str) -> list[str]:
        """The pre-tokenizer's pieces of ``text`` (special tokens are not treated specially)."""
        return self._pre.split(repair_surrogates(text))

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        """Encode ``text`` to token ids.

        A special token's string in ``text`` raises ``DisallowedSpecialToken``
        unless it is in ``allowed_special`` (or that is ``"all"``); allowed ones
        become their id. Surrogates are repaired as ``repair_surrogates`` says.
        """
        allowed = resolve_allowed(allowed_special, self.special_tokens)
        check_disallowed(text, self.special_tokens, allowed)
        text = repair_surrogates(text)
        if not allowed:
            return self.encode_ordinary(text)
        ids: list[int] = []
        for chunk, is_special in split_on_specials(text, allowed):
            if is_special:
                ids.append(self.special_tokens[chunk])
            else:
                ids.extend(self.encode_ordinary(chunk))
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode ``text`` treating special-token strings as plain text (no check, no specials)."""
        text = repair_surrogates(text)
        pieces = self._pre.split_fast(text)
        encode_piece = self._encode_piece
        ids: list[int] = []
        extend = ids.extend
        try:
            # The cache-miss path raises _Drifted for a piece holding a character
            # whose Unicode class drifted (see pretokenizer.py); a pattern that
            # skips characters could hide one, hence the length check.
            for piece in pieces:
                extend(encode_piece(piece))
            if sum(map(len, pieces)) != len(text) and self._pre.has_drifted(text):
                raise _Drifted
        except _Drifted:
            return self._encode_pinned(text)
        return ids

    def _encode_pinned(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._pre.split_pinned(text):
            if self._pre.has_drifted(piece):
                ids.extend(self._piece_ids(piece))  # uncached: rare, and the cache must stay drift-free
            else:
                ids.extend(self._encode_piece(piece))
        return ids

    def _encode_piece_uncached(self, piece: str) -> tuple[int, ...]:
        if self._pre.has_drifted(piece):
            raise _Drifted
        return self._piece_ids(piece)

    def _piece_ids(self, piece: str) -> tuple[int, ...]:
        data = piece.encode("utf-8")
        ranks = self.ranks
        if self._missing:
            kept = data.translate(None, self._missing)
            if len(kept) != len(data):
                if self.unknown_bytes == "error":
                    bad = sorted(set(data) - set(kept))
                    raise UnrepresentableBytes(
                        f"tokenizer {self.name!r} has no token for byte(s) "
                        f"{', '.join(f'0x{b:02x}' for b in bad)} in {piece!r}; remove them from the text, "
                        "or build the tokenizer with unknown_bytes='drop' to skip them"
                    )
                data = kept
                if not data:
                    return ()
        rank = ranks.get(data)
        if rank is not None:
            return (rank,)
        return tuple(ranks[part] for part in self._merge(data))

    def _merge(self, data: bytes) -> list[bytes]:
        if len(data) > _HEAP_THRESHOLD:
            return self._merge_heap(data)
        return self._merge_scan(data)

    def _merge_scan(self, data: bytes) -> list[bytes]:
        return merge_scan(data, self.ranks)

    def _merge_heap(self, data: bytes) -> list[bytes]:
        """The same merges as ``_merge_scan`` in O(n log n), for long pieces.

        Parts are a linked list keyed by their start offset; a heap holds
        candidate pairs as ``(rank, left start, left end, right end)`` and an
        entry is used only if both parts are still exactly those spans. Ordering
        by (rank, start) picks the leftmost lowest rank, as the scan does.
        """
        ranks = self.ranks
        n = len(data)
        end = list(range(1, n + 1))  # end[i]: end offset of the part starting at i; -1 once absorbed
        prev = list(range(-1, n - 1))  # prev[i]: start of the part before the one at i
        heap = []
        for i in range(n - 1):
            rank = ranks.get(data[i : i + 2])
            if rank is not None:
                heap.append((rank, i, i + 1, i + 2))
        heapq.heapify(heap)
        while heap:
            _, i, left_end, right_end = heapq.heappop(heap)
            if end[i] != left_end or left_end >= n or end[left_end] != right_end:
                continue  # stale: one of the two parts changed since this was pushed
            end[i] = right_end
            end[left_end] = -1
            if right_end < n:
                prev[right_end] = i
                rank = ranks.get(data[i : end[right_end]])
                if rank is not None:
                    heapq.heappush(heap, (rank, i, right_end, end[right_end]))
            p = prev[i]
            if p >= 0:
                rank = ranks.get(data[p:right_end])
                if rank is not None:
                    heapq.heappush(heap, (rank, p, i, right_end))
        parts = []
        i = 0
        while i < n:
            parts.append(data[i : end[i]])
            i = end[i]
        return parts

    def merge_steps(self, word: str | bytes) -> list[list[bytes]]:
        """The BPE merges applied to one pre-token, step by step.

        Returns the parts before any merge (single bytes) and after each merge;
        the last entry is what ``encode`` produces for this piece. When the
        whole piece is a token but the merges stop short of it, a final step
        shows the shortcut ``encode`` takes.
        """
        data = word.encode("utf-8") if isinstance(word, str) else bytes(word)
        if self._missing and self.unknown_bytes == "drop":
            data = data.translate(None, self._missing)
        ranks = self.ranks
        parts = [data[i : i + 1] for i in range(len(data))]
        steps = [list(parts)]
        while len(parts) > 1:
            pair_ranks = [ranks.get(a + b, _NO_MERGE) for a, b in zip(parts, parts[1:])]
            best = min(pair_ranks)
            if best == _NO_MERGE:
                break
            i = pair_ranks.index(best)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
            steps.append(list(parts))
        if len(parts) > 1 and data in ranks:
            steps.append([data])
        return steps

    # ------------------------------------------------------------------ decode

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (a special token gives its UTF-8 string)."""
        try:
            return self._decoder[token_id]
        except (KeyError, TypeError):
            raise UnknownTokenId(token_id, self.vocab_size, self.name) from None

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Concatenate the bytes of ``ids``; may end inside a UTF-8 character."""
        decoder = self._decoder
        if hasattr(ids, "tolist"):  # numpy arrays and torch tensors
            ids = ids.tolist()
        elif not isinstance(ids, (list, tuple)):
            ids = list(ids)
        try:
            return b"".join([decoder[i] for i in ids])
        except (KeyError, TypeError):
            raise UnknownTokenId(next(i for i in ids if not _is_token(decoder, i)), self.vocab_size, self.name) from None

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ``ids`` to text; invalid UTF-8 becomes U+FFFD (as tiktoken does)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --------------------------------------------------------------- training

    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int,
        pattern: str = GPT2_PATTERN,
        special_tokens: Sequence[str] = (ENDOFTEXT,),
        name: str = "bpe",
        *,
        at_most: bool = False,
    ) -> BPETokenizer:
        """Learn a byte-level BPE vocabulary of exactly ``vocab_size`` tokens from ``text``.

        A text too short for that many merges raises ``TrainingError``; with
        ``at_most`` training stops when no adjacent pair is left instead, and the
        vocabulary is as large as the text allows (a small demo text, say).

        ``vocab_size`` counts the 256 bytes, the learned merges and the special
        tokens (which take the last ids). Text between special-token strings is
        pre-tokenized and each unique piece is counted once with its frequency,
        so merge statistics cost O(unique pieces), not O(text). Pair counts are
        updated incrementally: a merge only revisits the pieces containing the
        merged pair, and a lazy max-heap finds the next most frequent pair
        (ties go to the pair of lowest ids, so training is deterministic).
        """
        special_tokens = list(dict.fromkeys(special_tokens))
        n_tokens = vocab_size - len(special_tokens)
        if n_tokens < 256:
            raise TrainingError(
                f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte tokens "
                f"plus {len(special_tokens)} special token(s)"
            )
        text = repair_surrogates(text)
        pre = PreTokenizer(pattern)
        chunks = special_regex(frozenset(special_tokens)).split(text) if special_tokens else [text]
        piece_counts: Counter[str] = Counter()
        for chunk in chunks:
            piece_counts.update(pre.split(chunk))

        words: list[list[int]] = []
        freqs: list[int] = []
        for piece, count in piece_counts.items():
            data = piece.encode("utf-8")
            if len(data) > 1:  # a single byte can never take part in a merge
                words.append(list(data))
                freqs.append(count)

        ranks: dict[bytes, int] = {bytes((b,)): b for b in range(256)}
        token_of: list[bytes] = [bytes((b,)) for b in range(256)]
        pair_counts: dict[tuple[int, int], int] = defaultdict(int)
        where: dict[tuple[int, int], set[int]] = defaultdict(set)
        for wi, word in enumerate(words):
            for pair in zip(word, word[1:]):
                pair_counts[pair] += freqs[wi]
                where[pair].add(wi)
        heap = [(-count, pair) for pair, count in pair_counts.items()]
        heapq.heapify(heap)

        while len(ranks) < n_tokens:
            pair = None
            while heap:
                neg_count, candidate = heapq.heappop(heap)
                current = pair_counts.get(candidate, 0)
                if current == -neg_count and current > 0:
                    pair = candidate
                    break
                if current > 0:  # the count fell since it was pushed: requeue at its true count
                    heapq.heappush(heap, (-current, candidate))
            if pair is None:
                if at_most:
                    break
                raise TrainingError(
                    f"the training text supports only {len(ranks) - 256} merges "
                    f"({len(ranks) + len(special_tokens)} tokens), fewer than vocab_size={vocab_size}; "
                    "use more text or a smaller vocab_size"
                )
            merged = token_of[pair[0]] + token_of[pair[1]]
            # The same bytes can come out of two different pairs ("a"+"bc", "ab"+"c");
            # ranks map bytes to one id, so reuse it and learn a further merge instead.
            new_id = ranks.get(merged)
            if new_id is None:
                new_id = len(token_of)
                ranks[merged] = new_id
                token_of.append(merged)
            changed: set[tuple[int, int]] = set()
            for wi in where.pop(pair, ()):
                word, freq = words[wi], freqs[wi]
                if len(word) < 2:
                    continue
                for old in zip(word, word[1:]):
                    pair_counts[old] -= freq
                    changed.add(old)
                merged_word: list[int] = []
                i = 0
                while i < len(word):
                    if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
                        merged_word.append(new_id)
                        i += 2
                    else:
                        merged_word.append(word[i])
                        i += 1
                words[wi] = merged_word
                for new in zip(merged_word, merged_word[1:]):
                    pair_counts[new] += freq
                    where[new].add(wi)
                    changed.add(new)
            pair_counts.pop(pair, None)
            for p in changed:
                count = pair_counts.get(p, 0)
                if count > 0:
                    heapq.heappush(heap, (-count, p))
                else:
                    pair_counts.pop(p, None)

        specials = {token: len(ranks) + i for i, token in enumerate(special_tokens)}
        return cls(ranks, pattern, specials, name)

    # ------------------------------------------------------------ GPT-2's files

    @classmethod
    def from_gpt2_files(
        cls, encoder_json: str | Path, vocab_bpe: str | Path, name: str = "gpt2"
    ) -> BPETokenizer:
        """Build GPT-2's tokenizer from OpenAI's ``encoder.json`` and ``vocab.bpe``."""
        ranks, specials = ranks_from_gpt2_files(encoder_json, vocab_bpe)
        return cls(ranks, GPT2_PATTERN, specials, name)


def merge_scan(data: bytes, ranks: Mapping[bytes, int]) -> list[bytes]:
    """Merge the lowest-rank adjacent pair (leftmost on a tie) until none is a token."""
    parts = [data[i : i + 1] for i in range(len(data))]
    # pair_ranks[i] is the rank of parts[i] + parts[i + 1] (or _NO_MERGE).
    pair_ranks = [ranks.get(data[i : i + 2], _NO_MERGE) for i in range(len(data) - 1)]
    while pair_ranks:
        best = min(pair_ranks)
        if best == _NO_MERGE:
            break
        i = pair_ranks.index(best)
        parts[i] += parts[i + 1]
        del parts[i + 1]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], _NO_MERGE)
        if i < len(pair_ranks):
            pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], _NO_MERGE)
    return parts


def merges_from_ranks(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list that rebuilds ``ranks``: for each multi-byte token, in rank order, the two
    parts that BPE over the lower-ranked tokens leaves it in.

    Hugging Face ``tokenizers`` and llama.cpp store a BPE vocabulary as merges
    (Sennrich et al., 2016), tiktoken and we as ranks; this is the way back
    (``ranks_from_gpt2_files`` goes forward). Raises ``TokenizerError`` for a
    vocabulary some token of which no single merge can make.
    """
    known: dict[bytes, int] = {}
    merges: list[tuple[bytes, bytes]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            parts = merge_scan(token, known)
            if len(parts) != 2:
                raise TokenizerError(
                    f"token {rank} {token!r} is not one merge of lower-ranked tokens (BPE leaves it in "
                    f"{len(parts)} parts), so this vocabulary has no merge list"
                )
            merges.append((parts[0], parts[1]))
        known[token] = rank
    return merges


# ------------------------------------------------------------------ GPT-2's encoder.json and vocab.bpe


def ranks_from_gpt2_files(encoder_json: str | Path, vocab_bpe: str | Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """Ranks and special tokens from GPT-2's ``encoder.json`` + ``vocab.bpe``.

    ``encoder.json`` maps token strings (bytes through ``bytes_to_unicode``) to
    ids; ``vocab.bpe`` lists the merges in order. The 256 single bytes plus one
    token per merge are the ranks; we check every merge's token has the id the
    merge order implies, and the remaining entries (``<|endoftext|>``) are the
    special tokens.
    """
    byte_of = {char: b for b, char in bytes_to_unicode().items()}

    def to_bytes(token: str, source: Path) -> bytes:
        try:
            return bytes(byte_of[c] for c in token)
        except KeyError as exc:
            raise TokenizerFileError(f"{source}: token {token!r} has a character outside GPT-2's byte map: {exc}") from None

    encoder_path, merges_path = Path(encoder_json), Path(vocab_bpe)
    try:
        encoder: dict[str, int] = json.loads(encoder_path.read_text(encoding="utf-8"))
        lines = merges_path.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError as exc:
        raise TokenizerFileError(f"GPT-2 tokenizer file {exc.filename} does not exist") from None
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]

    by_string = dict(encoder)
    ranks: dict[bytes, int] = {}
    for b, char in bytes_to_unicode().items():
        if char not in by_string:
            raise TokenizerFileError(f"{encoder_path} lacks the byte token {char!r} (byte 0x{b:02x})")
        ranks[bytes((b,))] = by_string.pop(char)
    for line_no, line in enumerate(lines, start=2):
        if not line:
            continue
        left, sep, right = line.partition(" ")
        if not sep or " " in right:
            raise TokenizerFileError(f"{merges_path}:{line_no}: expected two tokens separated by one space, got {line!r}")
        token = left + right
        if token not in by_string:
            raise TokenizerFileError(f"{merges_path}:{line_no}: merge {line!r} makes {token!r}, absent from {encoder_path}")
        token_id = by_string.pop(token)
        if token_id != len(ranks):
            raise TokenizerFileError(
                f"{merges_path}:{line_no}: merge {line!r} has id {token_id} in {encoder_path}, "
                f"but merge order gives {len(ranks)}; the two files do not belong together"
            )
        ranks[to_bytes(token, merges_path)] = token_id
    if len(ranks) != len(set(ranks.values())):
        raise TokenizerFileError(f"{encoder_path}: two tokens decode to the same bytes")
    return ranks, by_string
