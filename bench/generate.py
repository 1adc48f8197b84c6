"""Decoding speed: our models against transformers on the same weights, in one run.

    python bench/generate.py                      # GPT-2 124M, fp32 and bf16, batch 1 and 8, cache on/off
    python bench/generate.py --smollm2            # adds SmolLM2-135M rows (needs its GGUF)
    python bench/generate.py --quick              # fewer tokens, for a smoke run

Both sides get identical random GPT-2 weights (transformers' GPT2LMHeadModel
initialised with a seed, converted with our Hugging Face loader), the same
prompts (random ids, 32 tokens) and greedy decoding with a fixed number of new
tokens; the table says whether the generated tokens are identical. The
machine's memory read bandwidth is measured in the same run: batch-1 decoding
must read every weight once per token, so bandwidth / model bytes bounds
tokens/s, and the table prints how close we get to that bound.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.config import ModelConfig  # noqa: E402
from core.generate import GenerationConfig, generate  # noqa: E402
from core.model import GPTModel  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def read_bandwidth_gbs(size_mb: int = 1024, repeats: int = 5) -> float:
    """Best-of-n read bandwidth: summing a buffer larger than any cache touches each byte once."""
    buf = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32)
    buf.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return buf.numel() * 4 / best / 1e9


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def time_it(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up (allocations, one-off kernel choices)
    best, result = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def hf_generate(model, prompts: torch.Tensor, new_tokens: int, use_cache: bool) -> list[list[int]]:
    out = model.generate(
        prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, use_cache=use_cache, pad_token_id=0,
    )
    return out[:, prompts.shape[1]:].tolist()


def our_generate(model, prompts: torch.Tensor, new_tokens: int, use_cache: bool) -> list[list[int]]:
    return generate(model, prompts.tolist(), GenerationConfig(max_new_tokens=new_tokens, use_cache=use_cache))


def gpt2_pair(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    from core.hf_weights import convert_gpt2_state_dict, gpt2_config_from_hf

    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    cfg = gpt2_config_from_hf(hf.config.to_dict())
    ours = GPTModel(cfg).eval()
    ours.load_state_dict(convert_gpt2_state_dict(hf.state_dict(), cfg))
    return "GPT-2 124M", ours, hf


def smollm2_pair(gguf: Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    from core.gguf_weights import load_gguf

    cfg, state, _ = load_gguf(gguf)
    ours = GPTModel(cfg).eval()
    ours.load_state_dict(state)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    return "SmolLM2-135M", ours, hf


def bench_pair(name, ours, hf, args, bound_gbs, rows):
    vocab = ours.cfg.vocab_size
    g = torch.Generator().manual_seed(1)
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        ours_d, hf_d = ours.to(dtype), hf.to(dtype)
        for batch in args.batch:
            prompts = torch.randint(1000, vocab, (batch, args.prompt_tokens), generator=g)
            for use_cache in (True, False):
                new = args.new_tokens if use_cache else args.new_tokens_uncached
                with torch.inference_mode():
                    t_hf, out_hf = time_it(lambda: hf_generate(hf_d, prompts, new, use_cache), args.repeats)
                    t_us, out_us = time_it(lambda: our_generate(ours_d, prompts, new, use_cache), args.repeats)
                tps_hf, tps_us = batch * new / t_hf, batch * new / t_us
                bound = bound_gbs * 1e9 / weight_bytes(ours_d)
                rows.append([
                    name, dtype_name, batch, "on" if use_cache else "off", f"{tps_us:.1f}", f"{tps_hf:.1f}",
                    f"{tps_us / tps_hf:.2f}x", "yes" if out_us == out_hf else "NO",
                    f"{100 * tps_us / bound:.0f}%" if batch == 1 and use_cache else "",
                ])
                print("  " + " | ".join(str(c) for c in rows[-1]), file=sys.stderr, flush=True)


def print_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--new-tokens-uncached", type=int, default=32, help="uncached decoding is quadratic: fewer tokens")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--smollm2", action="store_true", help="add SmolLM2-135M rows")
    p.add_argument("--gguf", type=Path, default=None, help="SmolLM2 GGUF (default: the model cache)")
    p.add_argument("--no-gpt2", action="store_true")
    p.add_argument("--quick", action="store_true", help="16 new tokens, one repeat")
    args = p.parse_args()
    if args.quick:
        args.new_tokens, args.new_tokens_uncached, args.repeats = 16, 8, 1

    import transformers

    bandwidth = read_bandwidth_gbs()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"read bandwidth {bandwidth:.1f} GB/s; greedy, prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens ({args.new_tokens_uncached} without cache)", flush=True)
    rows: list[list] = []
    if not args.no_gpt2:
        bench_pair(*gpt2_pair(), args, bandwidth, rows)
    if args.smollm2:
        gguf = args.gguf
        if gguf is None:
            from core.download import downloads_dir

            gguf = downloads_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not gguf.is_file():
            sys.exit(f"--smollm2: {gguf} not found; run `scratchgpt download smollm2-135m-instruct`")
        bench_pair(*smollm2_pair(gguf), args, bandwidth, rows)
    print_table(["model", "dtype", "batch", "cache", "ours tok/s", "transformers tok/s", "ratio", "same tokens",
                 "of bandwidth bound"], rows)


if __name__ == "__main__":
    main()
