"""The classical baseline a fine-tuned spam classifier has to beat.

TF-IDF over word 1-2-grams and character 2-5-grams (within word boundaries),
then L2-regularised logistic regression: the standard strong baseline for
short-text classification (see e.g. Wang & Manning, 2012). It reads the data
through ``training.spam_data``, so the balanced 70/10/20 split is exactly the
one the fine-tune uses; C is picked on the validation split, the test split
is scored once.

    .venv/bin/python bench/spam_baseline.py --data ../shared/data/sms_spam/SMSSpamCollection
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.classification_metrics import classification_report  # noqa: E402
from training.spam_data import load_spam_splits, resolve_spam_data  # noqa: E402


def build_pipeline(c: float):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, make_pipeline

    features = FeatureUnion(
        [
            ("word", TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, lowercase=True)),
            ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, lowercase=True)),
        ]
    )
    return make_pipeline(features, LogisticRegression(C=c, max_iter=2000))


def run(data: Path, seed: int = 123) -> dict:
    splits = load_spam_splits(data, seed)
    texts = {name: [e.text for e in part] for name, part in splits.items()}
    labels = {name: [e.label for e in part] for name, part in splits.items()}

    start = time.perf_counter()
    best = None
    for c in (1.0, 3.0, 10.0, 30.0, 100.0):
        model = build_pipeline(c).fit(texts["train"], labels["train"])
        val = classification_report(labels["val"], list(model.predict(texts["val"])))
        # Ties go to the smaller C (stronger regularisation).
        if best is None or val["accuracy"] > best[1]["accuracy"]:
            best = (c, val, model)
    c, val, model = best
    result = {
        "model": "tfidf(word 1-2, char_wb 2-5) + logistic regression",
        "C": c,
        "sizes": {name: len(part) for name, part in splits.items()},
        "val": val,
        "test": classification_report(labels["test"], list(model.predict(texts["test"]))),
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="SMSSpamCollection file (default: download the UCI zip)")
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args()
    result = run(resolve_spam_data(args.data), args.seed)
    print(json.dumps(result, indent=2))
    test = result["test"]
    print(f"test accuracy {test['accuracy']:.4f}  F1 {test['f1']:.4f}  (n={test['n']}, C={result['C']})", file=sys.stderr)


if __name__ == "__main__":
    main()
