"""Decoding speed: our models against transformers on the same weights, in one run.

    python bench/generate.py                      # GPT-2 124M, fp32 and bf16, batch 1 and 8: plain, fast, cache off
    python bench/generate.py --smollm2            # adds SmolLM2-135M rows (needs its GGUF)
    python bench/generate.py --compile            # adds torch.compile rows (minutes of compiling)
    python bench/generate.py --threads 1 --clock cpu   # on a busy shared machine: see docs/performance.md
    python bench/generate.py --quick              # fewer tokens, for a smoke run

Both sides get identical weights (GPT-2: transformers' GPT2LMHeadModel
initialised with a seed, converted with our Hugging Face loader; SmolLM2: the
same GGUF file), the same prompts (random ids, 32 tokens) and greedy decoding
with a fixed number of new tokens. Paths of ours: ``plain`` is the model as
``core.model`` builds it, ``fast`` adds ``core.fast.transforms.make_fast`` (panels, fused
layers, screened output layer; SmolLM2 in fp32 decodes from the GGUF file's own
quantized blocks, ``core.fast.gguf_matvec``, which hold the same weights; GPT-2 in
fp32 at batch 1 decodes speculatively, ``core.fast.speculative``, and ``fast, no
draft`` is the same model token by token), and ``compiled`` adds torch.compile
with freezing.

Runs of transformers and of each of our paths alternate, and each figure is the
best of ``--repeats``, so load from other processes falls on all alike. The
machine's memory read bandwidth is measured in the same run (before and after,
the better one kept): batch-1 decoding must read every weight once per token,
so bandwidth / weight bytes bounds tokens/s, and the table prints how close we
get. "same" says whether our tokens equal transformers' at the same dtype;
"= fp32" counts the rows whose tokens equal the fp32 reference.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

from harness import (  # also puts the repository on sys.path
    bench_device, describe_device, gpt2_pair, load_average, print_table, synchronized,
)

from core.fast.serving import ServingDecoder  # noqa: E402
from core.fast.transforms import FastConfig, make_fast  # noqa: E402
from core.generation.generate import GenerationConfig, generate  # noqa: E402
from core.model import GPTModel  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NO_DRAFT = "fast, no draft"
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def read_bandwidth_gbs(clock, device: torch.device, size_mb: int = 1024, repeats: int = 5) -> float:
    """Best-of-n read bandwidth over a buffer larger than any cache, each byte read once.

    Two readers, the faster kept: a sum, and MKL's matrix-vector product (the
    kernel fp32 decoding streams its weights with; it prefetches better than
    the sum, so taking only the sum would understate the bound). On a GPU the same two, in its memory."""
    buf = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32, device=device)
    matrix, vector = buf.view(-1, 1024), torch.ones(1024, device=device)
    best = float("inf")
    for read in (buf.sum, lambda: matrix.mv(vector)):
        read()
        for _ in range(repeats):
            t = clock()
            read()
            best = min(best, clock() - t)
    return buf.numel() * 4 / best / 1e9


def as_decoder(path: GPTModel | ServingDecoder) -> ServingDecoder:
    """A path of ours as a serving decoder: a plain model's has nothing installed."""
    return path if isinstance(path, ServingDecoder) else ServingDecoder(path)


def weight_bytes(decoder: ServingDecoder) -> int:
    """Bytes a greedy decoding step reads: every parameter, a layer's GGUF blocks where it decodes
    from them, and the bf16 screen of a screened output layer that screens one row (core.fast.screened_head)."""
    from core.fast.gguf_matvec import GGUFHead, GGUFLinear
    from core.fast.screened_head import ScreenedHead

    model, argmax_head = decoder.model, decoder.argmax_head
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if isinstance(argmax_head, ScreenedHead) and argmax_head.panels is not None:
        total -= model.head_weight.numel() * 2  # fp32 -> bf16; the fp32 candidates are a few rows
    # The model's GGUF layers, and the decoder's GGUF output layer (not a module of the model).
    heads = [h for h in (argmax_head,) if isinstance(h, GGUFHead)]
    for module in [*model.modules(), *heads]:
        if isinstance(module, (GGUFLinear, GGUFHead)):
            dense = module.weight if isinstance(module, GGUFLinear) else model.head_weight
            total += module._blocks.matrix.nbytes - dense.numel() * dense.element_size()
    return total


def bytes_per_token(path: GPTModel | ServingDecoder, name: str, notes: list[str]) -> float:
    """Weight bytes read per new token at batch 1: :func:`weight_bytes`, or with speculative decoding
    (core.fast.speculative) the fp32 passes' and the drafted tokens' bytes over the tokens they gave."""
    decoder = as_decoder(path)
    full = weight_bytes(decoder)
    draft = decoder.draft
    if draft is None or not draft.counts["passes"]:
        return full
    c = draft.counts
    tokens = c["passes"] + c["accepted"]  # each pass gives the accepted guesses and one token of its own
    per_token = (c["passes"] * full + c["drafted"] * draft.nbytes()) / tokens
    notes.append(
        f"{name} fp32 fast, batch 1: {c['accepted']} of {c['drafted']} drafted tokens accepted, "
        f"{tokens / c['passes']:.1f} tokens per fp32 pass; bytes read per token {per_token / 1e6:.0f} MB "
        f"(fp32 pass {full / 1e6:.0f} MB, drafted token {draft.nbytes() / 1e6:.0f} MB), the bound's divisor")
    return per_token


def hf_generate(model, prompts: torch.Tensor, new_tokens: int, use_cache: bool) -> list[list[int]]:
    # The model's end-of-text token is unset (see no_eos), so transformers neither stops
    # at it nor, for min_new_tokens, masks it out: it decodes exactly as our loop does.
    out = model.generate(
        prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, use_cache=use_cache, pad_token_id=0,
    )
    return out[:, prompts.shape[1]:].tolist()


def our_generate(path: GPTModel | ServingDecoder, prompts: torch.Tensor, new_tokens: int,
                 use_cache: bool) -> list[list[int]]:
    """A plain model through core.generation's loop, a serving decoder through its own decoding."""
    cfg = GenerationConfig(max_new_tokens=new_tokens, use_cache=use_cache)
    if isinstance(path, ServingDecoder):
        return path.generate(prompts.tolist(), cfg)
    return generate(path, prompts.tolist(), cfg)


def no_eos(hf):
    hf.generation_config.eos_token_id = None
    return hf


def gpt2_models():
    ours, hf = gpt2_pair()
    return "GPT-2 124M", ours.eval(), no_eos(hf.eval()), None


def smollm2_pair(gguf: Path):
    """SmolLM2 on both sides from the same GGUF, and the file's quantized blocks for our fast path."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    from core.weights.gguf import load_gguf, read_gguf_blocks

    cfg, state, _ = load_gguf(gguf)
    ours = GPTModel(cfg).eval()
    ours.load_state_dict(state)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    return "SmolLM2-135M", ours, no_eos(hf), read_gguf_blocks(gguf)


def interleaved(runs: dict, repeats: int, clock) -> tuple[dict[str, float], dict[str, object]]:
    """Best time of each run, the runs taken in turn: one warm-up round, then ``repeats`` rounds."""
    best = {name: float("inf") for name in runs}
    outputs = {}
    for round_ in range(repeats + 1):
        for name, fn in runs.items():
            t = clock()
            outputs[name] = fn()
            if round_ > 0:
                best[name] = min(best[name], clock() - t)
    return best, outputs


def bench_pair(name, ours, hf, blocks, args, clock, rows, bounds, notes):
    """Append table rows; for batch-1 cached rows also (row index, tokens/s, weight bytes) to ``bounds``."""
    vocab = ours.cfg.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(1000, vocab, (b, args.prompt_tokens), generator=g).to(args.device) for b in args.batch}
    if args.device.type != "cpu":
        blocks = None  # the GGUF block kernels are CPU kernels
    reference: dict[tuple[int, bool], object] = {}  # fp32 transformers tokens, per batch and cache
    hf_fp32_tps: dict[tuple[int, bool], float] = {}
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        hf_d, plain = hf.to(args.device, dtype), ours.to(args.device, dtype)
        paths: dict[str, GPTModel | ServingDecoder] = {"plain": plain}
        if not args.no_fast:
            # The GGUF blocks hold the fp32 weights exactly; a bf16 model is other weights.
            paths["fast"] = make_fast(copy.deepcopy(plain), FastConfig(),
                                      gguf_blocks=blocks if dtype == torch.float32 else None)
            notes.append(f"{name} {dtype_name} fast: {paths['fast'].report}")
            if paths["fast"].draft is not None:
                # The same fast decoder decoding token by token: what speculative decoding adds. A shallow
                # copy shares the model, its heads and every panel copy; only the draft is left out.
                paths[NO_DRAFT] = copy.copy(paths["fast"])
                paths[NO_DRAFT].draft = None
        if args.compile:
            paths["compiled"] = make_fast(copy.deepcopy(plain), FastConfig(compile=True))
            notes.append(f"{name} {dtype_name} compiled: {paths['compiled'].report} (load {load_average()})")
        for batch in args.batch:
            for use_cache in (True, False):
                if not use_cache and args.no_uncached:
                    continue
                new = args.new_tokens if use_cache else args.new_tokens_uncached
                x = prompts[batch]
                # Without the cache only the book's loop is measured: the fast paths are for serving.
                # The draft only runs at batch 1.
                ours_paths = {p: m for p, m in paths.items() if batch == 1 or p != NO_DRAFT} if use_cache else {"plain": plain}
                runs = {"transformers": lambda: hf_generate(hf_d, x, new, use_cache)}
                runs.update({p: (lambda m=m: our_generate(m, x, new, use_cache)) for p, m in ours_paths.items()})
                for m in ours_paths.values():
                    if isinstance(m, ServingDecoder) and m.draft is not None:
                        m.draft.counts = dict.fromkeys(m.draft.counts, 0)
                with torch.inference_mode():
                    best, outs = interleaved(runs, args.repeats, clock)
                tps = {k: batch * new / t for k, t in best.items()}
                key = (batch, use_cache)
                if dtype_name == "fp32":
                    reference[key], hf_fp32_tps[key] = outs["transformers"], tps["transformers"]
                ref = reference.get(key)
                for path in ours_paths:
                    out = outs[path]
                    rows.append([
                        name, dtype_name, batch, "on" if use_cache else "off", path,
                        f"{tps[path]:.1f}", f"{tps['transformers']:.1f}",
                        f"{tps[path] / tps['transformers']:.2f}x",
                        f"{tps[path] / hf_fp32_tps[key]:.2f}x" if key in hf_fp32_tps else "",
                        "yes" if out == outs["transformers"] else "NO",
                        f"{sum(a == b for a, b in zip(out, ref))}/{batch}" if ref is not None else "",
                        "",  # of the bandwidth bound: filled in at the end, with the final bandwidth
                    ])
                    if batch == 1 and use_cache:
                        bounds.append((len(rows) - 1, tps[path], bytes_per_token(ours_paths[path], name, notes)))
                    print("  " + " | ".join(str(c) for c in rows[-1]), file=sys.stderr, flush=True)
        del paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--new-tokens-uncached", type=int, default=32, help="uncached decoding is quadratic: fewer tokens")
    p.add_argument("--no-uncached", action="store_true", help="skip the cache-off rows")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds after one warm-up round; best kept")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall: elapsed time; cpu: this thread's CPU time, steadier under load (use with --threads 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (GPU figures; the clock waits for the GPU)")
    p.add_argument("--no-fast", action="store_true", help="skip the core.fast.transforms rows")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows (compiles for minutes, then cached)")
    p.add_argument("--smollm2", action="store_true", help="add SmolLM2-135M rows")
    p.add_argument("--gguf", type=Path, default=None, help="SmolLM2 GGUF (default: the model cache)")
    p.add_argument("--no-gpt2", action="store_true")
    p.add_argument("--quick", action="store_true", help="16 new tokens, one repeat")
    args = p.parse_args()
    if args.quick:
        args.new_tokens, args.new_tokens_uncached, args.repeats = 16, 8, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() > 1:
        sys.exit("--clock cpu counts only the calling thread: use it with --threads 1")
    args.device = bench_device(p, args.device)
    if args.clock == "cpu" and args.device.type != "cpu":
        sys.exit("--clock cpu counts this thread's CPU time, not the GPU's: use --clock wall with --device cuda")
    clock = synchronized(CLOCKS[args.clock], args.device)

    import transformers

    load_before = load_average()
    bandwidth = read_bandwidth_gbs(clock, args.device)
    bandwidth_before = bandwidth
    print(f"{describe_device(args.device)}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, "
          f"{args.clock} clock; greedy, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens "
          f"({args.new_tokens_uncached} without cache), best of {args.repeats}; load average {load_before}", flush=True)
    rows: list[list] = []
    bounds: list[tuple[int, float, int]] = []
    notes: list[str] = []
    started = time.perf_counter()
    if not args.no_gpt2:
        bench_pair(*gpt2_models(), args, clock, rows, bounds, notes)
    if args.smollm2:
        gguf = args.gguf
        if gguf is None:
            from core.paths import downloads_dir

            gguf = downloads_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not gguf.is_file():
            sys.exit(f"--smollm2: {gguf} not found; run `scratchgpt download smollm2-135m-instruct`")
        bench_pair(*smollm2_pair(gguf), args, clock, rows, bounds, notes)
    bandwidth_after = read_bandwidth_gbs(clock, args.device)
    bandwidth = max(bandwidth_before, bandwidth_after)
    for i, tps, nbytes in bounds:
        rows[i][-1] = f"{100 * tps * nbytes / (bandwidth * 1e9):.0f}%"
    print_table([["model", "dtype", "batch", "cache", "ours", "ours tok/s", "transformers tok/s", "ratio",
                  "vs transformers fp32", "same", "= fp32", "of bandwidth bound"], *rows])
    for note in notes:
        print(f"- {note}")
    print(f"- read bandwidth {bandwidth_before:.1f} GB/s before, {bandwidth_after:.1f} after ({args.clock} clock); "
          f"bound = the better one / weight bytes; load average before {load_before}, "
          f"after {load_average()}; {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
