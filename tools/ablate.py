"""Ablation: DPO (frozen / precomputed reference), reference-free DPO, SimPO and DPO-Convex (each signal, with and
without length normalization), across beta and seeds, from one shared SFT model.

    python tools/ablate.py --out=ablation                                   # the full grid (hours on a CPU)
    python tools/ablate.py --out=ablation --datasets=tutor --betas=0.1,0.5 --seeds=0 --steps=60

For each dataset one SFT run (a small GPT-2 trained from scratch, byte-level
BPE) is the starting point of every variant; each variant runs as its own
`launch.train` process (so peak memory is its own; the config is
`configs/base.py` with command-line overrides, exactly as a user would run
it) for the same steps. Per run:
held-out preference accuracy (log pi(y_w) > log pi(y_l)) after training, the
drift of the held-out chosen log-prob (after - before; negative = likelihood
displacement), loss-curve roughness (std of successive loss differences over
the loss range), wall time per step and peak RSS. Writes ablation.json,
PNG plots and prints a table.

Datasets: `tutor` (the bundled conversations, alternating pairs) and `shp`, an
SHP-shaped JSONL set (the official prompt format "\\n\\nHuman: ...\\n\\nAssistant:",
long answers, the preferred one drawn from a more helpful vocabulary).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from cvxdpo.losses import SIGNALS  # noqa: E402

VARIANTS = {  # dotted config overrides per variant
    "dpo-frozen": ["train.method=dpo", "loss.name=sigmoid", "train.reference=frozen"],
    "dpo-precomputed": ["train.method=dpo", "loss.name=sigmoid", "train.reference=precomputed"],
    "reference-free": ["train.method=dpo", "loss.name=reference_free"],
    "simpo": ["train.method=dpo", "loss.name=simpo"],
    **{f"convex-{signal}{'-norm' if norm else ''}": ["train.method=dpo_convex", f"signal.name={signal}",
                                                     f"signal.normalize_length={norm}"]
       for signal in SIGNALS for norm in (False, True)},
}
HELPFUL = "because therefore for example specifically first then finally clearly measured checked".split()
VAGUE = "maybe whatever somehow anyway probably stuff things kinda basically dunno".split()
TOPICS = "baking engines law physics history cells contracts ovens stars rivers".split()


def write_shp_shaped(path: str, n: int = 3000, seed: int = 0) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = lambda vocab, k: " ".join(rng.choice(vocab + TOPICS) for _ in range(k))  # noqa: E731
            k = rng.randint(12, 30)
            row = {"prompt": f"\n\nHuman: How do {rng.choice(TOPICS)} work, question {i}?\n\nAssistant:",
                   "chosen": " " + words(HELPFUL, k), "rejected": " " + words(VAGUE, k)}
            f.write(json.dumps(row) + "\n")
    return path


def dataset_overrides(name: str, out: str) -> list[str]:
    if name == "tutor":
        return ["data.source=tutor", "data.truncation=keep_start"]
    path = write_shp_shaped(os.path.join(out, "shp_shaped.jsonl"))
    return ["data.source=jsonl", f"data.path={path}"]


COMMON = ["model.name=tiny", "model.init=scratch", "tokenizer.spec=train", "tokenizer.vocab_size=1024",
          "data.max_length=96", "data.max_prompt_length=48", "data.eval_fraction=0.05", "train.optimizer=adamw",
          "train.batch_size=16", "train.warmup_steps=10", "train.log_every=1", "train.eval_every=100000",
          "train.checkpoint_every=100000", "train.progress=false", "anchor.buffer=128",
          "anchor.refresh_every=5"]


def launch(workdir: str, overrides: list[str]) -> dict:
    """One `launch.train` run on configs/base.py with `overrides`; its peak RSS from the OS."""
    os.makedirs(workdir, exist_ok=True)
    cmd = [sys.executable, "-m", "launch.train", "--config=configs/base.py", f"--workdir={workdir}",
           *[f"--config.{item}" for item in overrides]]
    with open(os.path.join(workdir, "stdout.log"), "w") as out, open(os.path.join(workdir, "stderr.log"), "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        with open(os.path.join(workdir, "stderr.log")) as f:
            raise RuntimeError(f"{workdir}: {f.read()[-2000:]}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024}


def roughness(losses: list[float]) -> float:
    diffs = [b - a for a, b in zip(losses, losses[1:])]
    spread = max(losses) - min(losses)
    return statistics.pstdev(diffs) / spread if spread > 0 and len(diffs) > 1 else 0.0


def run_grid(args) -> list[dict]:
    from cvxdpo.train.logs import read_metrics

    rows = []
    for dataset in args.datasets.split(","):
        base = os.path.join(args.out, dataset)
        os.makedirs(base, exist_ok=True)
        data = dataset_overrides(dataset, base)
        sft = os.path.join(base, "sft")
        if not os.path.exists(os.path.join(sft, "hf", "model.safetensors")):
            launch(sft, COMMON + data + ["train.method=sft", f"train.steps={args.sft_steps}",
                                         "train.learning_rate=0.003"])
        for variant, spec in VARIANTS.items():
            if args.variants and variant not in args.variants.split(","):
                continue
            for beta in map(float, args.betas.split(",")):
                for seed in map(int, args.seeds.split(",")):
                    workdir = os.path.join(base, f"{variant}-beta{beta}-seed{seed}")
                    overrides = COMMON + data + spec + [
                        f"loss.beta={beta}", f"train.seed={seed}", f"train.steps={args.steps}",
                        "train.learning_rate=0.0003", f"train.init_from={sft}"]
                    report = launch(workdir, overrides)
                    metrics = read_metrics(workdir)
                    losses = [r["loss"] for r in metrics if "loss" in r]
                    evals = [r for r in metrics if "eval/loss" in r]
                    before, after = evals[0], evals[-1]
                    row = {"dataset": dataset, "variant": variant, "beta": beta, "seed": seed,
                           "accuracy": after["eval/preference_accuracy"],
                           "accuracy_before": before["eval/preference_accuracy"],
                           "chosen_drift": after["eval/logps/chosen"] - before["eval/logps/chosen"],
                           "roughness": roughness(losses),
                           "s_per_step": statistics.median(r["time/step_s"] for r in metrics if "loss" in r),
                           "peak_rss_mib": report["peak_rss_mib"], "losses": losses}
                    rows.append(row)
                    print(f"{dataset} {variant} beta={beta} seed={seed}: acc {row['accuracy']:.3f} "
                          f"drift {row['chosen_drift']:+.1f} rough {row['roughness']:.3f} "
                          f"{row['s_per_step']:.3f} s/step {row['peak_rss_mib']:.0f} MiB", flush=True)
    return rows


def summarize(rows: list[dict]) -> str:
    """Markdown: per dataset and variant, the mean over seeds at each beta, and the spread across beta."""
    lines = []
    for dataset in sorted({r["dataset"] for r in rows}):
        betas = sorted({r["beta"] for r in rows if r["dataset"] == dataset})
        lines.append(f"\n**{dataset}** — held-out preference accuracy (mean over seeds) per beta; drift of the "
                     "held-out chosen log-prob, roughness, s/step and peak RSS averaged over all runs\n")
        lines.append("| variant | " + " | ".join(f"beta {b}" for b in betas) +
                     " | min..max over beta | chosen drift | roughness | s/step | peak MiB |")
        lines.append("|---" * (len(betas) + 6) + "|")
        for variant in VARIANTS:
            sel = [r for r in rows if r["dataset"] == dataset and r["variant"] == variant]
            if not sel:
                continue
            accs = [statistics.fmean(r["accuracy"] for r in sel if r["beta"] == b) for b in betas]
            mean = lambda k: statistics.fmean(r[k] for r in sel)  # noqa: E731
            lines.append(f"| {variant} | " + " | ".join(f"{a:.3f}" for a in accs) +
                         f" | {min(accs):.3f}..{max(accs):.3f} | {mean('chosen_drift'):+.1f} | "
                         f"{mean('roughness'):.3f} | {mean('s_per_step'):.3f} | {mean('peak_rss_mib'):.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for dataset in sorted({r["dataset"] for r in rows}):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        betas = sorted({r["beta"] for r in rows if r["dataset"] == dataset})
        for variant in VARIANTS:
            sel = [r for r in rows if r["dataset"] == dataset and r["variant"] == variant]
            if not sel:
                continue
            accs = [statistics.fmean(r["accuracy"] for r in sel if r["beta"] == b) for b in betas]
            ax1.plot(betas, accs, marker="o", label=variant)
            first = min(sel, key=lambda r: (r["beta"], r["seed"]))
            ax2.plot(first["losses"], label=variant, alpha=0.8)
        ax1.set_xscale("log")
        ax1.set_xlabel("beta")
        ax1.set_ylabel("held-out preference accuracy")
        ax1.set_title(f"{dataset}: accuracy vs beta")
        ax2.set_xlabel("step")
        ax2.set_ylabel("train loss (symlog: distill is a squared loss)")
        ax2.set_yscale("symlog", linthresh=0.1)
        ax2.set_title(f"{dataset}: loss curves (seed 0, smallest beta)")
        ax1.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out, f"ablation_{dataset}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="ablation")
    parser.add_argument("--datasets", default="tutor,shp")
    parser.add_argument("--variants", default="")
    parser.add_argument("--betas", default="0.01,0.1,0.5,1.0")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--sft_steps", type=int, default=150)
    parser.add_argument("--replot", action="store_true", help="redo the table and plots from <out>/ablation.json")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.replot:
        with open(os.path.join(args.out, "ablation.json")) as f:
            rows = json.load(f)["rows"]
    else:
        rows = run_grid(args)
        with open(os.path.join(args.out, "ablation.json"), "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    print(summarize(rows))
    print("plots:", ", ".join(plot(rows, args.out)))


if __name__ == "__main__":
    main()
