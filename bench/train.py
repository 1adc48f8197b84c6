"""Training speed: our GPT-2 124M against transformers' GPT2LMHeadModel, in one run.

    python bench/train.py                          # batch 4 x context 256, fp32 and bf16 autocast
    python bench/train.py --steps 10 --warmup 3    # longer, steadier numbers
    python bench/train.py --profile                # also the top operators of one step of each

One training step = forward, next-token cross-entropy, backward, AdamW step
(the loop of ``training/pretrain.py``). Both models start from the same
random weights (transformers' model initialised with a seed, converted with
our Hugging Face loader), dropout off, the same batches, each with its own
AdamW. Steps alternate between the two models so that load from other
processes on a shared machine falls on both alike; the table reports the
median step time of each and the ratio. The first-step losses are printed
as a check that both compute the same thing.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from harness import bench_device, describe_device, gpt2_pair, load_average, synchronized  # also puts the repo on sys.path

from core.model import GPTModel  # noqa: E402
from training.loss import lm_loss  # noqa: E402
from training.pretrain import PretrainConfig, autocast_context, make_optimizer  # noqa: E402


def training_pair(device: torch.device) -> tuple[GPTModel, torch.nn.Module]:
    """Both GPT-2s in training mode, dropout off so their steps compute the same thing."""
    ours, hf = gpt2_pair(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return ours.to(device).train(), hf.to(device).train()


def make_step(model: torch.nn.Module, is_hf: bool, precision: str, device: torch.device):
    """One training step as each side runs it: ours through ``training.pretrain``'s own pieces
    (its AdamW, autocast and loss), transformers' model with the same AdamW settings and loss."""
    cfg = PretrainConfig(lr=1e-4, weight_decay=0.1, weight_decay_scope="all", precision=precision)
    # Both sides get the optimizer our job builds (fused AdamW), so the ratio is the models'.
    optimizer = make_optimizer(model, cfg, device)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with autocast_context(precision, device):
            if is_hf:
                logits = model(x).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            else:
                loss = lm_loss(model, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def profile_step(name: str, step, x: torch.Tensor, y: torch.Tensor, rows: int = 12) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=activities) as prof:
        step(x, y)
    print(f"\n-- {name}: top operators by self CPU time, one step --")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model and precision")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model and precision")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (GPU figures; the clock waits for the GPU)")
    parser.add_argument("--compile", action="store_true",
                        help="add our model under torch.compile (its first step compiles; that time is reported apart)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = bench_device(parser, args.device)
    clock = synchronized(time.perf_counter, device)

    import transformers

    print(
        f"{describe_device(device)}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, "
        f"batch {args.batch} x context {args.context}, {args.warmup} warm-up + {args.steps} timed steps, "
        f"load average {load_average()}"
    )
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 50257, (args.batch, args.context + 1), generator=g).to(device)
               for _ in range(args.warmup + args.steps)]
    tokens = args.batch * args.context
    rows = []
    for precision in args.precisions.split(","):
        ours, hf = training_pair(device)
        models = {"ours": (ours, False)}
        if args.compile:
            models["ours, compiled"] = (torch.compile(copy.deepcopy(ours)), False)
        models["transformers"] = (hf, True)
        steps = {name: make_step(model, is_hf, precision, device) for name, (model, is_hf) in models.items()}
        times: dict[str, list[float]] = {k: [] for k in steps}
        first_step: dict[str, float] = {}
        first_loss: dict[str, float] = {}
        for i, batch in enumerate(batches):
            x, y = batch[:, :-1], batch[:, 1:]
            for name, step in steps.items():
                t = clock()
                loss = step(x, y)
                dt = clock() - t
                first_loss.setdefault(name, loss)
                first_step.setdefault(name, dt)
                if i >= args.warmup:
                    times[name].append(dt)
        if args.profile:
            x, y = batches[0][:, :-1], batches[0][:, 1:]
            for name, step in steps.items():
                profile_step(f"{name} {precision}", step, x, y)
        median = {k: statistics.median(v) for k, v in times.items()}
        for name, (model, _) in models.items():
            n_params = sum(p.numel() for p in model.parameters())  # a tied weight is yielded once
            rows.append((precision, name, n_params, median[name], median["transformers"], first_loss[name], first_step[name]))
        del ours, hf, models, steps

    print(f"\n{'precision':<10}{'model':<16}{'params':>9}{'step (s)':>10}{'tokens/s':>10}{'first loss':>12}"
          f"{'first step (s)':>16}   vs transformers")
    for precision, name, n_params, t, t_hf, loss, first in rows:
        ratio = "" if name == "transformers" else f"{t_hf / t:.2f}x"
        print(f"{precision:<10}{name:<16}{n_params / 1e6:>8.1f}M{t:>10.3f}{tokens / t:>10.0f}{loss:>12.4f}{first:>16.1f}   {ratio}")
    print(f"load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
