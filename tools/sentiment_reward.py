"""Trains and scores the IMDb sentiment reward (the DPO paper's known reward: a classifier's logit of "positive").

    python tools/sentiment_reward.py train --data=../shared/data/imdb/train.csv.gz --out=MODEL [--json=train.json]
    python tools/sentiment_reward.py score --model=MODEL --data=../shared/data/imdb/test_public.csv.gz --json=s.json

train: chooses the L2 strength and the number of steps on a seeded held-out
share of --data (never on a test file), then fits on all of --data with them.
score: with a label column writes {"n", "accuracy"}; without one, {"n",
"mean_reward"}; --scores writes id,reward for every row.

CSV columns: id, rating, label (1 positive, 0 negative), text; .csv or .csv.gz,
read with the csv module (texts hold commas, quotes and newlines). A missing
file or column or a bad label is reported in one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cvxdpo.errors import CvxdpoError, DataError, MissingFileError  # noqa: E402
from cvxdpo.eval import sentiment  # noqa: E402


def read_rows(path: str, required: set[str]) -> tuple[list[str], list[dict]]:
    """(columns, rows) of a CSV or gzipped CSV that must have the `required` columns."""
    if not os.path.isfile(path):
        raise MissingFileError(f"data file {path!r} does not exist")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or ())
            missing = required - set(columns)
            if missing:
                raise DataError(f"{path}: CSV lacks column(s) {', '.join(sorted(missing))}")
            return columns, list(reader)
    except (UnicodeDecodeError, gzip.BadGzipFile, csv.Error) as e:
        raise DataError(f"{path}: not a readable UTF-8 CSV ({e})") from None


def labels_of(rows: list[dict], path: str) -> list[int]:
    """The label column as 0/1; anything else names its row, since a silently dropped row skews accuracy."""
    labels = []
    for i, row in enumerate(rows):
        value = (row["label"] or "").strip()
        if value not in ("0", "1"):
            raise DataError(f"{path}: row {i + 1} has label {row['label']!r}; expected 0 (negative) or 1 (positive)")
        labels.append(int(value))
    return labels


def write_json(path: str | None, record: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(record, f, indent=1)


def cmd_train(args) -> None:
    _, rows = read_rows(args.data, {"text", "label"})
    texts, labels = [row["text"] for row in rows], labels_of(rows, args.data)
    start = time.perf_counter()
    chosen, table = sentiment.select(texts, labels, l2_grid=[float(v) for v in args.l2_grid.split(",")],
                                     max_steps=args.max_steps, every=args.every, holdout=args.holdout, seed=args.seed)
    select_s = time.perf_counter() - start
    for row in table:
        print(f"l2={row['l2']:g} steps={row['steps']}: held-out accuracy {row['accuracy']:.4f}, "
              f"log-loss {row['log_loss']:.4f}")
    start, cpu = time.perf_counter(), time.process_time()
    model = sentiment.train(texts, labels, **chosen)
    train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    model.save(args.out)
    print(f"chose {chosen} on {round(args.holdout * len(texts))} held-out reviews ({select_s:.1f} s); "
          f"trained on {len(texts)} reviews in {train_s:.1f} s; saved to {args.out}")
    write_json(args.json, {"n": len(texts), "holdout": args.holdout, "seed": args.seed, "selection": table,
                           "chosen": chosen, "select_seconds": select_s, "train_seconds": train_s,
                           "train_cpu_seconds": train_cpu_s})


def write_scores(path: str, ids: list[str], rewards: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "reward"])
        writer.writerows(zip(ids, (f"{r:.6f}" for r in rewards), strict=True))


def cmd_score(args) -> None:
    columns, rows = read_rows(args.data, {"text", "id"} if args.scores else {"text"})
    labels = labels_of(rows, args.data) if "label" in columns else None
    rewards = sentiment.load(args.model).logits([row["text"] for row in rows])
    if labels is None:
        record = {"n": len(rows), "mean_reward": float(rewards.mean()) if len(rows) else float("nan")}
    else:
        record = {"n": len(rows), "accuracy": float(np.mean((rewards > 0) == np.asarray(labels, bool)))}
    if args.scores:
        write_scores(args.scores, [row["id"] for row in rows], rewards)
    write_json(args.json, record)
    print(json.dumps(record))


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="choose hyperparameters on a held-out share, fit, save")
    train.add_argument("--data", required=True, help="labelled CSV (.csv or .csv.gz)")
    train.add_argument("--out", required=True, help="folder for the model")
    train.add_argument("--json", help="write the selection table and timings here")
    train.add_argument("--l2_grid", default="1e-6,3e-6,1e-5", help="L2 strengths to compare, comma-separated")
    train.add_argument("--max_steps", type=int, default=150, help="longest run compared")
    train.add_argument("--every", type=int, default=25, help="compare step counts in multiples of this")
    train.add_argument("--holdout", type=float, default=0.1, help="share of --data held out for the choice")
    train.add_argument("--seed", type=int, default=0, help="which rows are held out")
    score = commands.add_parser("score", help="accuracy (labelled CSV) or mean reward of a saved model")
    score.add_argument("--model", required=True, help="folder written by train")
    score.add_argument("--data", required=True, help="CSV (.csv or .csv.gz); the label column is optional")
    score.add_argument("--json", help="write {n, accuracy} or {n, mean_reward} here")
    score.add_argument("--scores", help="write id,reward per row to this CSV")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        {"train": cmd_train, "score": cmd_score}[args.command](args)
    except CvxdpoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
