"""Encode/decode speed of the two backends, the benchmark behind the speed figures we quote.

    python bench/tokenizer.py ../shared/data/text/austen/*.txt
    python bench/tokenizer.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf FILES...
    python bench/tokenizer.py --train 4096 ../shared/data/text/austen/emma.txt

For each backend it times a *cold* encode (a fresh tokenizer, empty piece
cache), a *warm* one (the same tokenizer again) and a decode, and checks that
both backends return the same ids. ``--train N`` also times learning an
N-token vocabulary from the files (``BPETokenizer.train``). Use the best of
``--repeat`` runs on a shared machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from core.tokenizer.bpe import ENDOFTEXT, GPT2_PATTERN, BPETokenizer
from core.tokenizer.gpt2 import GPT2_EOT_ID, gpt2_ranks
from core.tokenizer.tiktoken_backend import TiktokenTokenizer


def _best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def benchmark(text: str, make: dict[str, Callable[[], Any]], repeat: int = 3) -> dict[str, dict[str, float]]:
    """Seconds for cold encode, warm encode and decode of ``text`` per backend (best of ``repeat``)."""
    results: dict[str, dict[str, float]] = {}
    ids_by_impl = {}
    for impl, factory in make.items():
        cold, ids = _best(lambda: factory().encode(text), repeat)
        tok = factory()
        tok.encode(text)
        warm, ids = _best(lambda: tok.encode(text), repeat)
        decode, _ = _best(lambda: tok.decode(ids), repeat)
        ids_by_impl[impl] = ids
        results[impl] = {"cold_s": cold, "warm_s": warm, "decode_s": decode, "tokens": len(ids)}
    first = next(iter(ids_by_impl.values()))
    if any(ids != first for ids in ids_by_impl.values()):
        raise AssertionError("the backends returned different ids")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="UTF-8 text files, concatenated")
    parser.add_argument("--gguf", type=Path, help="benchmark this GGUF file's tokenizer instead of GPT-2's")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--train", type=int, metavar="N", help="also time training an N-token vocabulary")
    args = parser.parse_args(argv)
    text = "".join(path.read_bytes().decode("utf-8") for path in args.files)
    if args.gguf:
        from core.tokenizer.gguf import tokenizer_from_gguf

        tok = tokenizer_from_gguf(args.gguf, "bpe")[0]
        label = f"{tok.name} (GGUF)"
    else:
        tok = BPETokenizer(gpt2_ranks(), GPT2_PATTERN, {ENDOFTEXT: GPT2_EOT_ID}, "gpt2")
        label = "gpt2"
    kwargs = {
        "ranks": tok.ranks,
        "pattern": tok.pattern,
        "special_tokens": tok.special_tokens,
        "name": tok.name,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "unknown_bytes": tok.unknown_bytes,
    }
    make = {"tiktoken": lambda: TiktokenTokenizer(**kwargs), "bpe": lambda: BPETokenizer(**kwargs)}
    results = benchmark(text, make, args.repeat)
    megabytes = len(text.encode("utf-8")) / 1e6
    print(f"{label}: {megabytes:.2f} MB, {results['bpe']['tokens']:,} tokens, best of {args.repeat}")
    for impl, r in results.items():
        print(
            f"  {impl:8s} encode cold {r['cold_s']:.2f} s ({megabytes / r['cold_s']:.1f} MB/s, "
            f"{r['tokens'] / r['cold_s'] / 1e6:.2f} M tok/s), warm {r['warm_s']:.2f} s "
            f"({megabytes / r['warm_s']:.1f} MB/s), decode {r['decode_s']:.3f} s"
        )
    if args.train:
        seconds, _ = _best(lambda: BPETokenizer.train(text, vocab_size=args.train), args.repeat)
        print(f"  train to {args.train:,} tokens: {seconds:.1f} s ({args.train - 257:,} merges over {megabytes:.2f} MB)")


if __name__ == "__main__":
    main()
