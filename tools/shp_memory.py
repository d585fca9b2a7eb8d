"""Peak memory while streaming a large SHP-shaped local copy: the reader must stay bounded.

    python tools/shp_memory.py --rows=200000 [--workdir=/tmp/shp-mem] [--json=out.json]

Writes `rows` rows in the exact 15-field SHP schema (text lengths like the real
set's, several rows per post) under workdir/<domain>/train.json, then reports
peak RSS before reading, after indexing, and after reading every kept pair and
batching a slice through the Grain pipeline, next to the file size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cvxdpo.data import pipeline, shp  # noqa: E402
from cvxdpo.data.tokenizer import load_tokenizer  # noqa: E402

WORDS = ("the of and to a in is you that it for was on are with as be this have but not they what "
         "cook bake oven flour engine pressure theory history court law student course cell energy").split()


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def write_rows(root: str, rows: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    domains = shp.DOMAINS[:6]
    files = {d: open(os.path.join(os.makedirs(os.path.join(root, d), exist_ok=True) or root, d, "train.json"), "w")
             for d in domains}
    post, history = 0, ""
    for i in range(rows):
        if i % 4 == 0:  # about four comment pairs per post
            post, history = post + 1, text(rng, rng.randint(20, 300))
        a, b = rng.randint(1, 500), rng.randint(1, 500)
        row = {"post_id": f"p{post}", "domain": f"{domains[post % 6]}_train", "upvote_ratio": 0.95, "history": history,
               "c_root_id_A": f"a{i}", "c_root_id_B": f"b{i}", "created_at_utc_A": 1636822112 + i,
               "created_at_utc_B": 1636822110 + i, "score_A": a, "score_B": b,
               "human_ref_A": text(rng, rng.randint(10, 200)), "human_ref_B": text(rng, rng.randint(10, 200)),
               "labels": int(a > b), "seconds_difference": 2.0, "score_ratio": max(a / b, b / a)}
        files[domains[post % 6]].write(json.dumps(row) + "\n")
    for f in files.values():
        f.close()
    return sum(os.path.getsize(f.name) for f in files.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--workdir", default="/tmp/cvxdpo-shp-memory")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    tok = load_tokenizer("gpt2")
    size = write_rows(args.workdir, args.rows)
    report = {"rows": args.rows, "file_mib": size / 2**20, "peak_mib_start": peak_mib()}
    t = time.time()
    source = shp.SHPSource(args.workdir, max_pairs_per_post=5)
    report.update(kept_pairs=len(source), index_s=time.time() - t, peak_mib_indexed=peak_mib())
    t = time.time()
    chars = sum(len(source[i].chosen) for i in range(len(source)))
    report.update(read_all_s=time.time() - t, chars_read=chars, peak_mib_read_all=peak_mib())
    cfg = pipeline.TokenizeConfig(max_length=512, max_prompt_length=256)
    it = iter(pipeline.make_dataset(source, tok, cfg, 64, seed=0))
    t = time.time()
    for _ in range(50):
        next(it)
    report.update(batches_50_s=time.time() - t, peak_mib_pipeline=peak_mib())
    width = max(len(k) for k in report)
    for k, v in report.items():
        print(f"{k:<{width}}  {v:,.1f}" if isinstance(v, float) else f"{k:<{width}}  {v:,}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
