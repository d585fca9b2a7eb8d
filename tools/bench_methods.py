"""Step time and peak memory of DPO (frozen reference), DPO (precomputed reference) and DPO-Convex, side by side.

    python tools/bench_methods.py --json=bench_methods.json [--model=small --batch=8 --length=64 --steps=12]

Each method runs in its own process (so peak RSS is its own) on the same data,
model shape, batch and sequence length; the first steps (compilation) are not
timed. For DPO-Convex the tool also times the ADMM refit alone on a full
buffer and reports its share of the step time: refit / (refresh_every * step).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

METHODS = {
    "dpo (frozen reference)": dict(method="dpo", reference="frozen"),
    "dpo (precomputed reference)": dict(method="dpo", reference="precomputed"),
    "dpo_convex": dict(method="dpo_convex"),
}
WARMUP = 3


def measure(name: str, args) -> dict:
    import tempfile

    import jax

    from cvxdpo.config import default_config
    from cvxdpo.data import tutor
    from cvxdpo.train import anchor
    from cvxdpo.train import step as step_lib
    from cvxdpo.train.trainer import Trainer

    c = default_config()
    c.model.name, c.model.init = args.model, "scratch"
    c.tokenizer.spec = "gpt2"
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:  # 1024 tutor pairs: a short
        for p in tutor.load_tutor_pairs(slide=True).pairs[:1024]:          # precompute pass for the reference
            f.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n")
    c.data.update(source="jsonl", path=f.name, max_length=args.length, max_prompt_length=args.length // 2,
                  eval_fraction=0.02)
    c.train.update(batch_size=args.batch, steps=10**6, progress=False, learning_rate=1e-4, **METHODS[name])
    c.anchor.update(buffer=args.batch * 8, refresh_every=args.refresh_every)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(c, workdir)
        state, times, tokens = trainer.state, [], 0
        for k in range(WARMUP + args.steps):
            batch = step_lib.place_batch(next(trainer.train_iter), trainer.mesh)
            t = time.perf_counter()
            state, metrics = trainer.train_step(state, batch)
            jax.block_until_ready(metrics)
            if k >= WARMUP:
                times.append(time.perf_counter() - t)
                tokens += int(batch["attention_mask"].sum())
        out = {"method": name, "median_step_s": statistics.median(times), "mean_step_s": statistics.fmean(times),
               "tokens_per_s": tokens / sum(times), "params": trainer.policy().cfg.num_params(),
               "state_leaves": len(jax.tree.leaves(state)),
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        anchor_cfg = getattr(trainer.objective, "anchor_cfg", None)
        if anchor_cfg is not None:  # DPO-Convex: its refit, timed alone on a full buffer
            refit = jax.jit(lambda s: anchor.refit(s, anchor_cfg))
            full = state.extra.replace(pairs_seen=state.extra.pairs_seen * 0 + anchor_cfg.buffer)
            jax.block_until_ready(refit(full))
            refit_times = []
            for _ in range(5):
                t = time.perf_counter()
                jax.block_until_ready(refit(full))
                refit_times.append(time.perf_counter() - t)
            out["refit_s"] = statistics.median(refit_times)
            out["admm_share"] = out["refit_s"] / (args.refresh_every * out["mean_step_s"])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--refresh_every", type=int, default=10)
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one method, in a child process
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure(args.only, args)))
        return
    rows = []
    for name in METHODS:
        cmd = [sys.executable, __file__, f"--only={name}", f"--model={args.model}", f"--batch={args.batch}",
               f"--length={args.length}", f"--steps={args.steps}", f"--refresh_every={args.refresh_every}"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"model {args.model} ({base['params']:,} parameters), batch {args.batch} pairs, length {args.length}")
    print("| method | median step (s) | vs frozen | tokens/s | peak RSS (MiB) | ADMM share of step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        share = f"{100 * r['admm_share']:.1f}%" if "admm_share" in r else "-"
        print(f"| {r['method']} | {r['median_step_s']:.3f} | {r['median_step_s'] / base['median_step_s']:.2f} | "
              f"{r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} | {share} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
