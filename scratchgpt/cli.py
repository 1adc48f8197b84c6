"""The ``scratchgpt`` command: one verb per job, each a thin call into core, training or app.

Like litgpt's CLI, each verb maps to a plain function. Jobs that take many
settings (pretrain, finetune, prepare) describe them as a dataclass; this
module turns its fields into flags (``--field-name``), and ``--config FILE``
reads the same fields from YAML or TOML. Imports happen per verb, so
``scratchgpt tokenize`` does not load FastAPI and ``scratchgpt serve`` does not
load the training code until it has to fine-tune something.

This is the only module that reaches both the service and the training jobs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

# The job-config reader is standard library only, so it costs nothing to import here.
from training.job_config import add_job_arguments, config_from_args

# -- shared helpers --------------------------------------------------------------


def resolve_checkpoint(name_or_dir: str) -> Path:
    """A checkpoint directory, or the name of a model `scratchgpt download` stores in the cache."""
    path = Path(name_or_dir).expanduser()
    if path.exists():
        return path
    from core.paths import cache_dir

    cached = cache_dir() / "models" / name_or_dir
    if cached.exists():
        return cached
    raise ValueError(
        f"--checkpoint {name_or_dir}: no such directory, and no downloaded model of that name "
        f"(run `scratchgpt download {name_or_dir}` if it is a known model)"
    )


def load(args: argparse.Namespace):
    from core.weights.checkpoint import load_checkpoint
    from core.device import resolve_device, resolve_dtype

    return load_checkpoint(resolve_checkpoint(args.checkpoint), resolve_device(args.device), resolve_dtype(args.dtype))


def load_for_decoding(args: argparse.Namespace, prefix_cache=None):
    """``load``, and the serving decoder the service decodes with (``core.fast.transforms.fast_for_serving``)."""
    from core.fast.serving import ServingDecoder
    from core.fast.transforms import fast_for_serving

    ckpt = load(args)
    if ckpt.task != "causal-lm":
        return ckpt, None
    if not args.no_fast_kernels:
        try:
            decoder = fast_for_serving(ckpt, prefix_cache)
            print(f"fast path: {decoder.report}", file=sys.stderr)
            return ckpt, decoder
        except ValueError as err:  # a damaged blocks file costs speed only
            print(f"fast path: none ({type(err).__name__}: {err}); decoding with torch's kernels", file=sys.stderr)
    return ckpt, ServingDecoder(ckpt.model, prefix_cache=prefix_cache)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a downloaded model's name")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy decoding")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    # --no-gguf-kernels: the flag's name before the kernels covered dense checkpoints too.
    p.add_argument("--no-fast-kernels", "--no-gguf-kernels", dest="no_fast_kernels", action="store_true",
                   help="decode with torch's own kernels: no GGUF blocks, panels or screened output layer")


def add_measure_arguments(p: argparse.ArgumentParser) -> None:
    """`evaluate instruct --measure`: the development measure (training/instruct_measure.py) and its decoding."""
    g = p.add_argument_group("development measure")
    g.add_argument("--measure", action="store_true",
                   help="--data is the fine-tune job's data file: score its validation and test splits' checkable "
                        "answers and the built-in multi-turn conversations, beside case-sensitive ROUGE-L")
    g.add_argument("--checkable-only", action="store_true",
                   help="answer only the checkable items (ROUGE-L then covers those alone)")
    g.add_argument("--split-seed", type=int, default=123, help="the fine-tune job's --seed (which split)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy decoding")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--sample-seed", type=int, default=0, help="seed of the first sample when sampling")
    g.add_argument("--samples", type=int, default=1, help="answers per item when sampling (all are scored)")


def generation_config(args: argparse.Namespace, ckpt) -> Any:
    from core.generation.generate import GenerationConfig

    stop_strings = tuple(ckpt.chat_template.stop) if ckpt.chat_template and args.template != "none" else ()
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, stop_token_ids=ckpt.stop_token_ids, stop_strings=stop_strings,
    )


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


# -- verbs -----------------------------------------------------------------------


def cmd_tokenize(args: argparse.Namespace) -> None:
    from core.tokenizer import tokenize_file

    if not Path(args.file).is_file():
        raise ValueError(f"--file {args.file}: no such file")
    print(json.dumps(tokenize_file(Path(args.file), args.impl)))


def cmd_generate(args: argparse.Namespace) -> None:
    ckpt, decoder = load_for_decoding(args)
    if ckpt.task != "causal-lm":
        raise ValueError(f"--checkpoint {ckpt.path} is a {ckpt.task} model; use `scratchgpt classify`")
    prompt = args.prompt
    if ckpt.chat_template is not None and args.template != "none":
        prompt = ckpt.chat_template.render([{"role": "user", "content": prompt}])
    ids = ckpt.tokenizer.encode(prompt, allowed_special="all")
    for chunk in decoder.stream(ckpt.tokenizer, ids, generation_config(args, ckpt)):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(args: argparse.Namespace) -> None:
    from core.fast.prefix_cache import PrefixCache

    ckpt, decoder = load_for_decoding(args, PrefixCache())  # each turn prefills only its new message
    template = ckpt.chat_template
    if template is None:
        raise ValueError(f"--checkpoint {ckpt.path} has no chat template; it is not a chat model")
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    print(f"Chatting with {ckpt.name} ({ckpt.config.family}, {ckpt.model.cfg.n_layers} layers). "
          "Empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            user = input(">>> ").strip()
        except EOFError:
            break
        if not user:
            break
        messages.append({"role": "user", "content": user})
        ids = ckpt.tokenizer.encode(template.render(messages), allowed_special="all")
        # Oldest turns go first when the conversation outgrows the context window.
        budget = ckpt.config.context_length - args.max_new_tokens
        while len(ids) > budget and len(messages) > 2:
            drop = 1 if messages[0]["role"] == "system" else 0
            del messages[drop : drop + 2]
            ids = ckpt.tokenizer.encode(template.render(messages), allowed_special="all")
        answer = []
        for chunk in decoder.stream(ckpt.tokenizer, ids, generation_config(args, ckpt)):
            print(chunk.text, end="", flush=True)
            answer.append(chunk.text)
        print()
        messages.append({"role": "assistant", "content": "".join(answer).strip()})


def cmd_classify(args: argparse.Namespace) -> None:
    from core.classifier import classify

    ckpt = load(args)
    if ckpt.task != "classification":
        raise ValueError(f"--checkpoint {ckpt.path} is not a classifier (task {ckpt.task})")
    results = classify(ckpt, args.texts)
    print_json([{"text": t, "label": p.label, "probabilities": p.probabilities} for t, p in zip(args.texts, results)])


def cmd_download(args: argparse.Namespace) -> None:
    from core.weights.download import download_model

    path = download_model(args.name, size=args.size, from_dir=args.from_dir, from_file=args.from_file,
                          from_tf_dir=args.from_tf_dir)
    print(path)


def cmd_prepare(args: argparse.Namespace) -> None:
    from training.prepare import PrepareConfig, prepare

    print_json(prepare(config_from_args(PrepareConfig, args)))


def cmd_pretrain(args: argparse.Namespace) -> None:
    from training.pretrain import PretrainConfig, pretrain

    print(pretrain(config_from_args(PretrainConfig, args)))


def cmd_finetune_spam(args: argparse.Namespace) -> None:
    from training.finetune_spam import SpamConfig, finetune_spam

    print(finetune_spam(config_from_args(SpamConfig, args)))


def cmd_finetune_instruct(args: argparse.Namespace) -> None:
    from training.finetune_instruct import InstructConfig, finetune_instruct

    print(finetune_instruct(config_from_args(InstructConfig, args)))


def cmd_evaluate_lm(args: argparse.Namespace) -> None:
    from training.evaluate_lm import evaluate_lm

    print_json(evaluate_lm(resolve_checkpoint(args.checkpoint), Path(args.data), device=args.device))


def cmd_evaluate_spam(args: argparse.Namespace) -> None:
    from training.evaluate_spam import evaluate_spam

    print_json(evaluate_spam(resolve_checkpoint(args.checkpoint), Path(args.data), device=args.device))


def cmd_evaluate_instruct(args: argparse.Namespace) -> None:
    from training.evaluate_instruct import evaluate_instruct, measure_instruct

    if args.measure:
        from core.generation.sampling import SamplingConfig

        sampling = SamplingConfig(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.sample_seed,
            repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
            presence_penalty=args.presence_penalty,
        )
        print_json(measure_instruct(
            resolve_checkpoint(args.checkpoint), Path(args.data), Path(args.out), split_seed=args.split_seed,
            sampling=sampling, samples=args.samples, max_new_tokens=args.max_new_tokens, device=args.device,
            checkable_only=args.checkable_only,
        ))
        return
    print_json(evaluate_instruct(
        resolve_checkpoint(args.checkpoint), Path(args.data), Path(args.out),
        judge_url=args.judge_url, judge_model=args.judge_model, device=args.device,
    ))


def cmd_export(args: argparse.Namespace) -> None:
    from core.weights.checkpoint import CheckpointError, load_checkpoint
    from core.weights.export_gguf import GGUF_OUTTYPES, export_gguf
    from core.weights.export_hf import HF_OUTTYPES, ExportError, check_destination, export_hf

    outtypes = HF_OUTTYPES if args.format == "hf" else GGUF_OUTTYPES
    if args.outtype is not None and args.outtype not in outtypes:
        raise ValueError(f"--outtype {args.outtype} is not a {args.format} weight type; choose {', '.join(outtypes)}")
    try:
        check_destination(args.out, args.format)
    except ExportError as err:
        raise ValueError(f"--out: {err}") from None
    try:
        ckpt = load_checkpoint(resolve_checkpoint(args.checkpoint))
    except CheckpointError as err:
        raise ValueError(f"--checkpoint: {err}") from None
    if ckpt.task != "causal-lm":
        raise ValueError(f"--checkpoint {ckpt.path} is a {ckpt.task} model; only causal language models export")
    export = export_hf if args.format == "hf" else export_gguf
    print(export(ckpt, args.out, args.outtype))


def cmd_serve(args: argparse.Namespace) -> None:
    from scratchgpt.serve import serve

    serve(args)


def cmd_db_upgrade(args: argparse.Namespace) -> None:
    from app.db import upgrade
    from app.db.engine import shown_url
    from app.settings import Settings

    url = args.database_url or Settings().database_url
    upgrade(url)
    # The compose prepare step logs this line: never with the password.
    print(f"database at {shown_url(url)} is at the latest migration")


# -- the parser --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scratchgpt", description="Build, pretrain, fine-tune and serve GPT-style language models from scratch."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, func: Callable, help_text: str, sub=verbs) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = verb("download", cmd_download, "fetch a model (gpt2, smollm2-135m-instruct) into the cache and convert it")
    p.add_argument("name", help="gpt2 or smollm2-135m-instruct")
    p.add_argument("--size", default=None, help="GPT-2 size: 124M, 355M, 774M or 1558M")
    p.add_argument("--from-dir", type=Path, default=None, help="import a local copy of the model's files")
    p.add_argument("--from-file", type=Path, default=None, help="import a local file (a GGUF for SmolLM2)")
    p.add_argument("--from-tf-dir", type=Path, default=None,
                   help="import OpenAI's original GPT-2 release (hparams.json + model.ckpt.*); needs "
                        "pip install -e '.[tensorflow]'")

    p = verb("tokenize", cmd_tokenize, "print the GPT-2 token ids of a file as a JSON array")
    p.add_argument("--file", required=True)
    p.add_argument("--impl", choices=["bpe", "tiktoken"], default="tiktoken",
                   help="bpe: our from-scratch BPE; tiktoken: OpenAI's library (same ids)")

    from training.finetune_instruct import InstructConfig
    from training.finetune_spam import SpamConfig
    from training.prepare import PrepareConfig
    from training.pretrain import PretrainConfig

    add_job_arguments(verb("prepare", cmd_prepare, "tokenize text files into memmapped train/val token files"), PrepareConfig)
    add_job_arguments(verb("pretrain", cmd_pretrain, "pretrain a model from scratch (works under torchrun)"), PretrainConfig)

    finetune = verb("finetune", None, "fine-tune a base model").add_subparsers(dest="job", required=True, metavar="JOB")
    add_job_arguments(verb("spam", cmd_finetune_spam, "train the SMS spam classifier", finetune), SpamConfig)
    add_job_arguments(verb("instruct", cmd_finetune_instruct, "instruction fine-tuning (full or LoRA)", finetune), InstructConfig)

    evaluate = verb("evaluate", None, "evaluate a checkpoint").add_subparsers(dest="job", required=True, metavar="JOB")
    for name, func, text in (
        ("lm", cmd_evaluate_lm, "loss and perplexity on a text or token file"),
        ("spam", cmd_evaluate_spam, "classify every line of a UCI SMS spam file"),
        ("instruct", cmd_evaluate_instruct, "generate for every entry; ROUGE-L and an optional judge"),
    ):
        p = verb(name, func, text, evaluate)
        p.add_argument("--checkpoint", required=True)
        p.add_argument("--data", required=True)
        p.add_argument("--device", default="auto")
        if name == "instruct":
            p.add_argument("--out", required=True, help="where to write the responses JSON")
            p.add_argument("--judge-url", default=None, help="OpenAI-compatible endpoint, e.g. http://localhost:11434/v1")
            p.add_argument("--judge-model", default=None)
            add_measure_arguments(p)

    p = verb("generate", cmd_generate, "continue a prompt (through the chat template when the model has one)")
    add_model_arguments(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--template", choices=["auto", "none"], default="auto",
                   help="auto: wrap the prompt in the checkpoint's chat template if it has one")
    add_sampling_arguments(p)

    p = verb("chat", cmd_chat, "multi-turn chat in the terminal, streaming answers")
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--template", choices=["auto"], default="auto", help=argparse.SUPPRESS)
    add_sampling_arguments(p, max_new_tokens=256)

    p = verb("classify", cmd_classify, "label texts with a classifier checkpoint")
    add_model_arguments(p)
    p.add_argument("texts", nargs="+")

    p = verb("export", cmd_export, "write a checkpoint as a Hugging Face directory or a GGUF file for other engines")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a downloaded model's name")
    p.add_argument("--format", required=True, choices=["hf", "gguf"],
                   help="hf: transformers/vLLM/TGI directory; gguf: one llama.cpp file")
    p.add_argument("--out", required=True, type=Path, help="directory (hf) or file (gguf) to write")
    p.add_argument("--outtype", default=None, choices=["f32", "f16", "bf16", "q8_0"],
                   help="weight type: hf keeps the stored dtype by default; gguf defaults to f16 (q8_0 is gguf only)")

    p = verb("serve", cmd_serve, "run the web service; missing fine-tuned models are made in the background")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (each loads the models)")
    p.add_argument("--chat-checkpoint", default=None, help="chat model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--classifier-checkpoint", default=None, help="spam classifier directory")
    p.add_argument("--spam-data", type=Path, default=None,
                   help="local SMSSpamCollection file for fine-tuning the classifier when it is missing")
    p.add_argument("--instruct-data", type=Path, default=None,
                   help="local instruction JSON for fine-tuning the chat model when it is missing "
                        "(default: ../shared/data's copy, else the book's file is downloaded)")
    p.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                   help="run the missing fine-tunes (spam classifier, instruction model) as background jobs; "
                        "--no-train serves what exists, for those who train separately")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per model worker (default: torch decides; 1 helps on a busy machine)")
    p.add_argument("--setup", action=argparse.BooleanOptionalAction, default=True,
                   help="obtain the chat model when missing and use the default models; --no-setup serves "
                        "exactly the checkpoints given")

    db = verb("db", None, "database maintenance").add_subparsers(dest="job", required=True, metavar="JOB")
    p = verb("upgrade", cmd_db_upgrade, "apply the database migrations", db)
    p.add_argument("--database-url", default=None, help="default: SCRATCHGPT_DATABASE_URL or the settings default")
    return parser


def show_job_progress() -> None:
    """The jobs in ``training`` and ``core`` report progress through ``logging``; print it.

    Only their loggers get the handler: the service configures its own (JSON lines).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    for name in ("training", "core"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    show_job_progress()
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except (ValueError, OSError, RuntimeError) as e:
        if args.debug or os.environ.get("SCRATCHGPT_DEBUG"):
            raise
        parser.exit(2, f"scratchgpt {args.verb}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
