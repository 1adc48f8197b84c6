"""`scratchgpt serve`: make sure the default models exist, then run the web service.

On a fresh machine the service has nothing to serve, so this step obtains the
chat model (SmolLM2-135M-Instruct, converted to our format) and fine-tunes the
spam classifier on it when either is missing, showing progress, before the
server starts. It is the one place where the training jobs and the service
meet, which is why it lives in the CLI package and not in ``app``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHAT_MODEL = "smollm2-135m-instruct"
CLASSIFIER_NAME = "spam-classifier"
# The recipe chosen by validation accuracy (docs/finetuning.md): the last block, the final norm
# and the head, lr 3e-4 (the book's 5e-5 is the job's default), 5 epochs, best epoch kept.
CLASSIFIER_RECIPE = {"trainable_blocks": 1, "lr": 3e-4, "epochs": 5}
SHARED_SPAM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sms_spam" / "SMSSpamCollection"


def say(message: str) -> None:
    print(f"[scratchgpt] {message}", file=sys.stderr, flush=True)


def ensure_chat_model(chosen: str | None) -> Path:
    from core.paths import cache_dir
    from core.weights.download import download_model

    if chosen:
        return Path(chosen)
    path = cache_dir() / "models" / CHAT_MODEL
    if not (path / "config.json").is_file():
        say(f"chat model missing: obtaining {CHAT_MODEL} (about 100 MB)")
        path = Path(download_model(CHAT_MODEL))
    return path


def ensure_classifier(chosen: str | None, base: Path, spam_data: Path | None) -> Path | None:
    """The classifier to serve, fine-tuned first when missing; None when its data cannot be had.

    Without the SMS data (offline, no --spam-data) the chat still serves: the spam page and
    API then answer that the classifier is missing and how to make it.
    """
    from core.paths import cache_dir
    from core.weights.fetch import DownloadError

    if chosen:
        return Path(chosen)
    path = cache_dir() / "models" / CLASSIFIER_NAME
    if (path / "config.json").is_file():
        return path
    from training.finetune_spam import SpamConfig, finetune_spam

    data = spam_data or (SHARED_SPAM if SHARED_SPAM.is_file() else None)
    say(f"spam classifier missing: fine-tuning it on {base.name} (about 4 minutes on one CPU core)")
    config = SpamConfig(base=str(base), out=str(path), **CLASSIFIER_RECIPE, **({"data": str(data)} if data else {}))
    try:
        return Path(finetune_spam(config))
    except DownloadError as e:
        say(f"could not obtain the SMS Spam Collection ({e.__cause__ or 'offline'}); serving without the "
            "spam classifier. Give the SMSSpamCollection file (or its UCI zip) with --spam-data FILE to make it.")
        return None


def serve(args: argparse.Namespace) -> None:
    from app.server import serve as run_server
    from app.settings import Settings

    overrides = {}
    if args.setup:
        chat = ensure_chat_model(args.chat_checkpoint)
        classifier = ensure_classifier(args.classifier_checkpoint, chat, args.spam_data)
        overrides = {"chat_checkpoint": chat}
        if classifier is not None:
            overrides["classifier_checkpoint"] = classifier
    else:
        if args.chat_checkpoint:
            overrides["chat_checkpoint"] = Path(args.chat_checkpoint)
        if args.classifier_checkpoint:
            overrides["classifier_checkpoint"] = Path(args.classifier_checkpoint)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be at least 1")
        overrides["torch_threads"] = args.threads
    settings = Settings(**overrides)
    say(f"serving on http://{args.host}:{args.port}/  (API docs at /docs)")
    run_server(settings, host=args.host, port=args.port, workers=args.workers)
