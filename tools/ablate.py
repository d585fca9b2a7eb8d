"""The IMDb controlled-sentiment benchmark (the DPO paper's section 6.1), end to end, resumable.

    python tools/ablate.py --task=imdb_sentiment --out=runs/imdb_sentiment [--data=../shared/data/imdb]
    python tools/ablate.py --task=imdb_sentiment --out=runs/imdb_toy --quick        # the whole pipeline, toy size

Steps, each a command of its own that this tool runs in order (a step whose
output exists is skipped, so a rerun after a stop continues where it stopped):
  1. reward    tools/sentiment_reward.py train on the train reviews; its accuracy on the public test reviews
  2. sft       launch.train configs/imdb_sentiment.py:sft (a small GPT-2 and its BPE from scratch)
  3. pairs     2-8 token prefixes of train reviews, 4 SFT samples each, scored by the reward, all 6 ordered
               pairs (ties dropped): train_pairs.jsonl, valid_pairs.jsonl (other train reviews) and
               test_pairs.jsonl (prefixes of the public test reviews)
  4. tune      each method's learning rate, on the validation pairs (see step_tune): tuned_lr.json
  5. runs      launch.train configs/imdb_sentiment.py:METHOD for every method x strength (loss.beta) x seed,
               each followed by launch.evaluate on test_pairs.jsonl against the SFT model: reward and
               KL(pi || pi_SFT) of samples at temperature 1, held-out pair accuracies
  6. evaluate  the same evaluation of the SFT model (and of any run not evaluated yet)
  7. report    ablation.json, frontier.png (reward against KL, seeds as intervals) and a markdown table of
               reward at matched KL
The grid is ordered seed-major, so a run stopped early still holds every method at its first seed;
`--jobs` runs (default 2) go side by side, each child on one XLA thread.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import gzip
import json
import os
import random
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from configs.imdb_sentiment import METHODS  # noqa: E402

STRENGTHS = {  # loss.beta per method: each method's own range
    "dpo": (0.02, 0.1, 0.5), "dpo_precomputed": (0.1,), "reference_free": (0.05, 0.1, 0.5),
    "ipo": (0.1, 0.5, 1.0), "simpo": (1.0, 2.0, 2.5), "convex_margin": (0.05, 0.1, 0.5),
    "convex_distill": (0.05, 0.1, 0.5), "convex_soft_label": (0.05, 0.1, 0.5),
    # The controls run at DPO-Convex's middle strength: each point is compared with DPO-Convex's curve at
    # the same KL (the matched-KL table) and with DPO-Convex seed by seed.
    **{f"convex_margin_{control}": (0.1,) for control in ("linear", "shuffled", "constant", "frozen")},
}
FULL = dict(seeds=(0, 1, 2), strengths=3, learning_rates=(3e-4, 1e-3, 3e-3), reward_rows=0, sft_steps=3000, train_prefixes=2000, valid_prefixes=100,
            test_prefixes=300, steps=150, eval_prompts=150, samples=2, max_new_tokens=40)
QUICK = dict(seeds=(0,), strengths=1, learning_rates=(1e-4, 3e-4), reward_rows=2000, sft_steps=20, train_prefixes=24, valid_prefixes=8, test_prefixes=8,
             steps=4, eval_prompts=4, samples=2, max_new_tokens=8)
QUICK_METHODS = ("dpo", "convex_margin")
# The default grid decides whether the convex anchor matters: DPO-Convex, reference-free DPO and DPO swept,
# DPO-Convex's four controls and precomputed-reference DPO beside them; about 2.5 hours on 2 CPU cores.
# `--methods=all` adds IPO, SimPO and the other two signals, each swept.
DEFAULT_METHODS = ("dpo", "reference_free", "convex_margin", "convex_margin_linear", "convex_margin_shuffled",
                   "convex_margin_constant", "convex_margin_frozen", "dpo_precomputed")
# Methods that take their learning rate from another's tuning: the same math (precomputed reference
# log-probs equal the frozen reference's), or controls that must share DPO-Convex's budget.
TUNED_WITH = {"dpo_precomputed": "dpo",
              **{f"convex_margin_{c}": "convex_margin" for c in ("linear", "shuffled", "constant", "frozen")}}
SAMPLES_PER_PREFIX = 4


def run(cmd: list[str], log: str, jobs: int = 1) -> dict:
    """A child process with its output in `log`; its wall time and peak RSS from the OS. With `jobs` > 1
    processes side by side, each child's XLA keeps to one thread (small models gain more from running
    side by side than from threads within one step)."""
    start = time.perf_counter()
    env = dict(os.environ)
    if jobs > 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                            " intra_op_parallelism_threads=1").strip()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        with open(log) as f:
            raise SystemExit(f"step failed: {' '.join(cmd)}\n{f.read()[-2000:]}")
    return {"wall_s": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024}


def done(path: str) -> bool:
    return os.path.exists(path)


def subset_csv(src: str, dst: str, rows: int, seed: int) -> str:
    """A seeded random subset of an IMDb CSV (the files are sorted by label)."""
    with gzip.open(src, "rt", newline="") as f:
        reader = csv.DictReader(f)
        data, fields = list(reader), reader.fieldnames
    random.Random(seed).shuffle(data)
    with open(dst, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(data[:rows])
    return dst


def step_reward(a, size) -> None:
    reward = os.path.join(a.out, "reward")
    if done(os.path.join(reward, "test.json")):
        return
    train = a.train_csv
    if size["reward_rows"]:
        train = subset_csv(a.train_csv, os.path.join(a.out, "reward_train_subset.csv"), size["reward_rows"], 0)
    tool = os.path.join(ROOT, "tools", "sentiment_reward.py")
    os.makedirs(reward, exist_ok=True)
    run([sys.executable, tool, "train", f"--data={train}", f"--out={reward}"], os.path.join(a.out, "reward.log"))
    run([sys.executable, tool, "score", f"--model={reward}", f"--data={a.test_csv}",
         f"--json={os.path.join(reward, 'test.json')}"], os.path.join(a.out, "reward_score.log"))


def step_sft(a, size) -> None:
    sft = os.path.join(a.out, "sft")
    if done(os.path.join(sft, "hf", "model.safetensors")):
        return
    train = a.train_csv if not size["reward_rows"] else os.path.join(a.out, "reward_train_subset.csv")
    run([sys.executable, "-m", "launch.train", "--config=configs/imdb_sentiment.py:sft", f"--workdir={sft}",
         f"--config.data.path={train}", f"--config.train.steps={size['sft_steps']}", "--config.train.progress=false"],
        os.path.join(a.out, "sft.log"))


def _prefixes(csv_path: str, tokenizer, n: int, seed: int, skip: int = 0) -> list[str]:
    """2-8 token prefixes of `n` seeded-random reviews (after the first `skip` of that order)."""
    from cvxdpo.data import imdb

    reviews, _ = imdb.load_reviews(csv_path, None)
    random.Random(seed).shuffle(reviews)
    return [p for p, _ in imdb.prefix_prompts(reviews[skip:skip + n], tokenizer, seed)]


def _write_pairs(path: str, prompts: list[str], model, tokenizer, reward, size, seed: int) -> int:
    """All 6 ordered pairs of 4 SFT samples per prompt, the higher reward chosen (ties dropped)."""
    from cvxdpo.train import sample_eval

    encoded = [tokenizer.encode(p) for p in prompts]
    s = sample_eval.sample(model, tokenizer, encoded, SAMPLES_PER_PREFIX, 1.0, size["max_new_tokens"], seed)
    scores = reward([prompts[i] + t for i, t in zip(s.prompt_index, s.texts)])
    count = 0
    with open(path + ".tmp", "w") as f:
        for k, prompt in enumerate(prompts):
            rows = [(s.texts[j], scores[j]) for j in range(len(s.texts)) if s.prompt_index[j] == k]
            for i in range(len(rows)):
                for j in range(i + 1, len(rows)):
                    (a_text, a_r), (b_text, b_r) = rows[i], rows[j]
                    if a_r == b_r or a_text == b_text:
                        continue
                    chosen, rejected = (a_text, b_text) if a_r > b_r else (b_text, a_text)
                    f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
                    count += 1
    os.replace(path + ".tmp", path)
    return count


def step_pairs(a, size) -> None:
    if done(os.path.join(a.out, "pairs.json")):
        return
    from cvxdpo.eval.rewards import get_reward
    from cvxdpo.model import hub
    from launch import common

    model_dir = os.path.join(a.out, "sft", "hf")
    model, tokenizer = hub.load_pretrained(model_dir), common.model_tokenizer(model_dir)
    reward = get_reward("sentiment", os.path.join(a.out, "reward"))
    train_csv = a.train_csv if not size["reward_rows"] else os.path.join(a.out, "reward_train_subset.csv")
    splits = {"train": _prefixes(train_csv, tokenizer, size["train_prefixes"], 1),
              "valid": _prefixes(train_csv, tokenizer, size["valid_prefixes"], 1, skip=size["train_prefixes"]),
              "test": _prefixes(a.test_csv, tokenizer, size["test_prefixes"], 2)}
    counts = {name: _write_pairs(os.path.join(a.out, f"{name}_pairs.jsonl"), prompts, model, tokenizer, reward,
                                 size, seed) for seed, (name, prompts) in enumerate(splits.items())}
    with open(os.path.join(a.out, "pairs.json"), "w") as f:
        json.dump({"prefixes": {k: len(v) for k, v in splits.items()}, "pairs": counts}, f, indent=2)


def middle_strength(size, method: str) -> float:
    values = STRENGTHS[method][:size["strengths"]]
    return values[len(values) // 2]


def strengths(size, method: str) -> tuple[float, ...]:
    """The method's strengths in the grid: the first `size['strengths']`, or only the middle one."""
    return (middle_strength(size, method),) if size.get("middle_only") else STRENGTHS[method][:size["strengths"]]


def tuned_lr(a, method: str) -> float:
    with open(os.path.join(a.out, "tuned_lr.json")) as f:
        return json.load(f)["learning_rate"][TUNED_WITH.get(method, method)]


def grid(a, size, methods) -> list[tuple[str, float, float, int]]:
    """(method, strength, learning rate, seed) cells, seed-major, at each method's tuned learning rate."""
    return [(m, beta, tuned_lr(a, m), seed) for seed in size["seeds"] for m in methods for beta in strengths(size, m)]


def run_name(method: str, beta: float, lr: float, seed: int) -> str:
    return f"{method}-beta{beta:g}-lr{lr:g}-seed{seed}"


def train(a, size, method: str, beta: float, lr: float, seed: int) -> str:
    """One preference run (skipped when it finished before); its workdir."""
    workdir = os.path.join(a.out, "runs", run_name(method, beta, lr, seed))
    if done(os.path.join(workdir, "usage.json")):
        return workdir
    usage = run([sys.executable, "-m", "launch.train", f"--config=configs/imdb_sentiment.py:{method}",
                 f"--workdir={workdir}", f"--config.data.path={os.path.join(a.out, 'train_pairs.jsonl')}",
                 f"--config.data.eval_path={os.path.join(a.out, 'valid_pairs.jsonl')}",
                 f"--config.train.init_from={os.path.join(a.out, 'sft')}", f"--config.loss.beta={beta}",
                 f"--config.train.learning_rate={lr}", f"--config.train.seed={seed}",
                 f"--config.train.steps={size['steps']}", "--config.train.progress=false"],
                os.path.join(a.out, "runs", f"{run_name(method, beta, lr, seed)}.log"), a.jobs)
    with open(os.path.join(workdir, "usage.json"), "w") as f:
        json.dump(usage, f)
    return workdir


def side_by_side(a, cells, work, what: str) -> None:
    """`work(*cell)` for every cell, `--jobs` at a time in order; a progress line per cell that did work."""
    start, finished = time.perf_counter(), 0
    with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:
        futures = {pool.submit(work, *cell): cell for cell in cells}
        for k, future in enumerate(concurrent.futures.as_completed(futures), 1):
            if future.exception() is not None:
                pool.shutdown(cancel_futures=True)  # the runs under way finish; no new one starts
                raise future.exception()
            if not future.result():
                continue
            finished += 1
            elapsed = time.perf_counter() - start
            print(f"[{k}/{len(cells)}] {what} {run_name(*futures[future])}; {elapsed / 60:.0f} min for {finished} "
                  f"runs, about {elapsed / finished * (len(cells) - k) / 60:.0f} min left", flush=True)


def validation_accuracy(workdir: str) -> float:
    """The final held-out accuracy of the method's own implicit reward on the validation pairs."""
    from cvxdpo.train.logs import read_metrics

    return [r for r in read_metrics(workdir) if "eval/rewards/accuracies" in r][-1]["eval/rewards/accuracies"]


def step_tune(a, size, methods) -> None:
    """Each method's learning rate, chosen on the validation pairs (never the test prefixes): at its middle
    strength and seed 0, the rate of `size['learning_rates']` whose run has the highest held-out accuracy of
    its own implicit reward. Methods in TUNED_WITH take the rate of the method they follow."""
    path = os.path.join(a.out, "tuned_lr.json")
    tuned = json.load(open(path)) if done(path) else {"learning_rate": {}, "validation_accuracy": {}}
    families = [m for m in methods if m not in TUNED_WITH] + \
        sorted({TUNED_WITH[m] for m in methods if m in TUNED_WITH} - set(methods))
    cells = [(m, middle_strength(size, m), lr, 0) for m in families for lr in size["learning_rates"]
             if f"{lr:g}" not in tuned["validation_accuracy"].get(m, {})]  # a widened range adds only its new rates
    families = [m for m in families if any(cell[0] == m for cell in cells)]
    def tune_cell(*cell) -> bool:
        new = not done(os.path.join(a.out, "runs", run_name(*cell), "usage.json"))
        train(a, size, *cell)
        return new

    side_by_side(a, cells, tune_cell, "trained (tuning)")
    for m in families:
        scores = {float(lr): acc for lr, acc in tuned["validation_accuracy"].get(m, {}).items()}
        scores.update({cell[2]: validation_accuracy(os.path.join(a.out, "runs", run_name(*cell)))
                       for cell in cells if cell[0] == m})
        scores = dict(sorted(scores.items()))
        tuned["validation_accuracy"][m] = {f"{lr:g}": acc for lr, acc in scores.items()}
        tuned["learning_rate"][m] = max(scores, key=lambda lr: (scores[lr], -lr))  # ties: the smaller rate
        print(f"{m}: learning rate {tuned['learning_rate'][m]:g} (validation accuracy "
              + ", ".join(f"{lr:g}: {acc:.3f}" for lr, acc in scores.items()) + ")", flush=True)
    with open(path, "w") as f:
        json.dump(tuned, f, indent=2)


def train_and_evaluate(a, size, method: str, beta: float, lr: float, seed: int) -> bool:
    """One cell of the grid, evaluated right after training (so that a stopped grid leaves evaluated runs);
    False when both had finished before."""
    workdir = os.path.join(a.out, "runs", run_name(method, beta, lr, seed))
    if done(os.path.join(workdir, "eval_test", "eval.json")):
        return False
    return evaluate(a, size, train(a, size, method, beta, lr, seed))


def step_runs(a, size, methods) -> None:
    side_by_side(a, grid(a, size, methods), lambda *cell: train_and_evaluate(a, size, *cell),
                 "trained and evaluated")


def evaluate(a, size, model_dir: str) -> bool:
    """launch.evaluate of one model on the test pairs; False when its eval.json already exists."""
    out = os.path.join(model_dir, "eval_test")
    if done(os.path.join(out, "eval.json")):
        return False
    run([sys.executable, "-m", "launch.evaluate", f"--model={model_dir}", f"--reference={os.path.join(a.out, 'sft')}",
         "--data_source=jsonl", f"--data_path={os.path.join(a.out, 'test_pairs.jsonl')}", f"--out={out}",
         f"--samples={size['samples']}", "--temperatures=1.0", f"--max_new_tokens={size['max_new_tokens']}",
         f"--max_prompts={size['eval_prompts']}", "--reward=sentiment",
         f"--reward_model={os.path.join(a.out, 'reward')}", f"--max_length={64}", "--max_prompt_length=16"],
        os.path.join(model_dir, "eval_test.log"), a.jobs)
    return True


def step_evaluate(a, size, methods) -> None:
    """The SFT model's evaluation, and any trained run's that is missing."""
    evaluate(a, size, os.path.join(a.out, "sft"))
    trained = [cell for cell in grid(a, size, methods)
               if done(os.path.join(a.out, "runs", run_name(*cell), "usage.json"))]
    side_by_side(a, trained, lambda *cell: train_and_evaluate(a, size, *cell), "evaluated")


def collect(a, size, methods) -> list[dict]:
    from cvxdpo.train.logs import read_metrics

    rows = []
    for method, beta, lr, seed in grid(a, size, methods):
        workdir = os.path.join(a.out, "runs", run_name(method, beta, lr, seed))
        path = os.path.join(workdir, "eval_test", "eval.json")
        if not done(path):
            continue
        with open(path) as f:
            ev = json.load(f)
        with open(os.path.join(workdir, "usage.json")) as f:
            usage = json.load(f)
        sampled = ev["sampling"]["temperature_1"]
        logged = read_metrics(workdir)
        rows.append({"method": method, "beta": beta, "learning_rate": lr, "seed": seed, "reward": sampled["reward"],
                     "kl": sampled["kl"], "distinct_2": sampled["distinct_2"],
                     "repeated_3gram_rate": sampled["repeated_3gram_rate"]["mean"], "accuracy_raw": ev["accuracy"]["raw"],
                     "accuracy_reference_adjusted": ev["accuracy"]["reference_adjusted"],
                     "step_s": statistics.median(r["time/step_s"] for r in logged if "time/step_s" in r),
                     "peak_rss_mib": usage["peak_rss_mib"], **anchor_diagnostics(logged)})
    return rows


ANCHOR_KEYS = ("weight_change_mean", "weight_change_p90", "heldout_accuracy", "anchor_to_policy")


def anchor_diagnostics(logged: list[dict]) -> dict:
    """A DPO-Convex run's anchor diagnostics averaged over the logged steps after its first refit (none for
    the other methods)."""
    fitted = [r for r in logged if r.get("convex/iterations", 0) > 0]
    return {f"anchor_{k}": statistics.fmean(r[f"convex/{k}"] for r in fitted) for k in ANCHOR_KEYS} if fitted else {}


def paired_table(rows, size, anchor: str = "convex_margin") -> str:
    """Each method at its middle strength against `anchor` at its own, seed by seed (same data order and
    evaluation prompts): the mean and range over seeds of the reward and KL differences."""
    def at(method, seed):
        return next((r for r in rows if r["method"] == method and r["seed"] == seed
                     and r["beta"] == middle_strength(size, method)), None)

    lines = [f"| method (middle strength) | seeds | reward − {anchor} (mean, [min, max]) | KL − {anchor} | "
             "anchor Δweight mean / p90 | anchor held-out accuracy |", "|---|---|---|---|---|---|"]
    for method in sorted({r["method"] for r in rows} - {anchor}):
        pairs = [(at(method, s), at(anchor, s)) for s in sorted({r["seed"] for r in rows})]
        pairs = [(x, y) for x, y in pairs if x and y]
        if not pairs:
            continue
        dr = [x["reward"]["mean"] - y["reward"]["mean"] for x, y in pairs]
        dk = [x["kl"]["mean"] - y["kl"]["mean"] for x, y in pairs]
        diag = [x for x, _ in pairs if "anchor_heldout_accuracy" in x]
        change = (f"{statistics.fmean(x['anchor_weight_change_mean'] for x in diag):.3f} / "
                  f"{statistics.fmean(x['anchor_weight_change_p90'] for x in diag):.3f}") if diag else "-"
        accuracy = f"{statistics.fmean(x['anchor_heldout_accuracy'] for x in diag):.3f}" if diag else "-"
        lines.append(f"| {method} | {len(pairs)} | {statistics.fmean(dr):+.3f} [{min(dr):+.3f}, {max(dr):+.3f}] | "
                     f"{statistics.fmean(dk):+.2f} [{min(dk):+.2f}, {max(dk):+.2f}] | {change} | {accuracy} |")
    return "\n".join(lines)


def _mean_over_seeds(rows, method, beta, key):
    vals = [r[key]["mean"] if isinstance(r[key], dict) else r[key] for r in rows
            if r["method"] == method and r["beta"] == beta]
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def _interpolate(points, level: float) -> float | None:
    """The reward at KL `level` on the piecewise-linear curve through (KL, reward) points sorted by KL; None
    outside the curve's KL range."""
    for (k0, r0), (k1, r1) in zip(points, points[1:]):
        if k0 <= level <= k1 and k1 > k0:
            return r0 + (r1 - r0) * (level - k0) / (k1 - k0)
    return next((r for k, r in points if k == level), None)


def matched_kl_table(rows, sft_reward: float) -> str:
    """Reward of each method at a few KL levels: each seed's curve over the method's strengths interpolated
    at the level, then the mean ± sd over the seeds whose curve reaches it (a seed's KL range varies)."""
    methods = sorted({r["method"] for r in rows})
    curves = {(m, seed): sorted((r["kl"]["mean"], r["reward"]["mean"]) for r in rows
                                if r["method"] == m and r["seed"] == seed)
              for m in methods for seed in sorted({r["seed"] for r in rows if r["method"] == m})}
    all_kl = sorted(k for points in curves.values() if len(points) > 1 for k, _ in points)
    if not all_kl:
        return f"SFT reward: {sft_reward:.3f}. No method has more than one strength yet: no reward at matched KL."
    levels = sorted({round(all_kl[int(q * (len(all_kl) - 1))], 1) for q in (0.2, 0.4, 0.6, 0.8)})
    lines = [f"SFT reward: {sft_reward:.3f}. Reward at matched KL: each seed's curve over the method's strengths, "
             "linearly interpolated at the KL level; mean ± sd over the seeds whose curve reaches that KL (their "
             "count in brackets); '-' where none does:", "",
             "| method | " + " | ".join(f"KL {k:g}" for k in levels) + " |", "|---" * (len(levels) + 1) + "|"]
    for m in methods:
        cells = []
        for level in levels:
            values = [v for (method, _), points in curves.items() if method == m
                      for v in (_interpolate(points, level),) if v is not None]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.3f} ± {sd:.3f} ({len(values)})" if values else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def against_curve_table(rows, anchor: str = "convex_margin") -> str:
    """Each method's point at each strength against `anchor`'s curve at the same KL, seed by seed: the
    reward of the point minus the anchor's curve (same seed) interpolated at the point's KL. Controls with one
    strength are compared at matched KL this way; '-' where the anchor's curve does not reach the KL."""
    def curve(seed):
        return sorted((r["kl"]["mean"], r["reward"]["mean"]) for r in rows if r["method"] == anchor and r["seed"] == seed)

    lines = [f"| method | beta | seeds at a KL {anchor} reaches | reward − {anchor} at the same KL (mean, [min, max]) |",
             "|---|---|---|---|"]
    for method in sorted({r["method"] for r in rows} - {anchor}):
        for beta in sorted({r["beta"] for r in rows if r["method"] == method}):
            diffs = [r["reward"]["mean"] - v for r in rows if r["method"] == method and r["beta"] == beta
                     for v in (_interpolate(curve(r["seed"]), r["kl"]["mean"]),) if v is not None]
            cell = f"{statistics.fmean(diffs):+.3f} [{min(diffs):+.3f}, {max(diffs):+.3f}]" if diffs else "-"
            lines.append(f"| {method} | {beta:g} | {len(diffs)} | {cell} |")
    return "\n".join(lines)


def runs_table(rows) -> str:
    """Per method and strength: seed means ± sd, the mean half-width of a run's 95% bootstrap interval over
    prompts (the within-run uncertainty), degeneration checks, pair accuracies, step time and memory."""
    lines = ["| method | beta | seeds | reward (mean ± sd over seeds) | ± 95% CI over prompts | KL | distinct-2 | "
             "repeated 3-grams | accuracy raw | accuracy ref-adj | step s | peak RSS MiB |", "|---" * 12 + "|"]
    for method in sorted({r["method"] for r in rows}):
        for beta in sorted({r["beta"] for r in rows if r["method"] == method}):
            (rw, rs, n), (kl, ks, _) = (_mean_over_seeds(rows, method, beta, k) for k in ("reward", "kl"))
            mean = {k: _mean_over_seeds(rows, method, beta, k)[0] for k in (
                "distinct_2", "repeated_3gram_rate", "accuracy_raw", "accuracy_reference_adjusted", "step_s",
                "peak_rss_mib")}
            half = statistics.fmean((r["reward"]["hi"] - r["reward"]["lo"]) / 2 for r in rows
                                    if r["method"] == method and r["beta"] == beta)
            lines.append(f"| {method} | {beta:g} | {n} | {rw:.3f} ± {rs:.3f} | {half:.3f} | {kl:.2f} ± {ks:.2f} | "
                         f"{mean['distinct_2']:.3f} | {mean['repeated_3gram_rate']:.3f} | {mean['accuracy_raw']:.3f} | "
                         f"{mean['accuracy_reference_adjusted']:.3f} | {mean['step_s']:.3f} | {mean['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def plot_frontier(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5))
    ax = fig.add_subplot()
    for method in sorted({r["method"] for r in rows}):
        betas = sorted({r["beta"] for r in rows if r["method"] == method})
        kl = [_mean_over_seeds(rows, method, b, "kl") for b in betas]
        rw = [_mean_over_seeds(rows, method, b, "reward") for b in betas]
        ax.errorbar([k[0] for k in kl], [r[0] for r in rw], xerr=[k[1] for k in kl], yerr=[r[1] for r in rw],
                    marker="o", capsize=3, label=method)
    ax.set_xlabel("KL(pi || pi_SFT), nats per sample (temperature 1)")
    ax.set_ylabel("sentiment reward (classifier logit)")
    ax.set_title("IMDb controlled sentiment: reward vs KL (mean ± sd over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def step_report(a, size, methods) -> None:
    rows = collect(a, size, methods)
    with open(os.path.join(a.out, "sft", "eval_test", "eval.json")) as f:
        sft_reward = json.load(f)["sampling"]["temperature_1"]["reward"]["mean"]
    with open(os.path.join(a.out, "tuned_lr.json")) as f:
        tuned = json.load(f)
    with open(os.path.join(a.out, "ablation.json"), "w") as f:
        json.dump({"size": size, "rows": rows, "sft_reward": sft_reward, "tuning": tuned}, f, indent=2)
    report = "\n\n".join((runs_table(rows), matched_kl_table(rows, sft_reward), against_curve_table(rows),
                            paired_table(rows, size))) if rows \
        else "no finished runs"
    with open(os.path.join(a.out, "ablation.md"), "w") as f:
        f.write(report + "\n")
    if rows:
        plot_frontier(rows, os.path.join(a.out, "frontier.png"))
    print(report)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="imdb_sentiment", choices=["imdb_sentiment"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "imdb"),
                        help="folder with train.csv.gz and test_public.csv.gz")
    parser.add_argument("--quick", action="store_true", help="the whole pipeline at toy size (minutes)")
    parser.add_argument("--methods", default="", help="'all' or a comma-separated subset of " + ",".join(METHODS)
                        + " (default: " + ",".join(DEFAULT_METHODS) + ")")
    parser.add_argument("--seeds", default="", help="comma-separated seeds instead of the grid's (e.g. 0)")
    parser.add_argument("--middle_only", action="store_true",
                        help="each method at its middle strength only (3 seeds of every method before the sweep)")
    parser.add_argument("--jobs", type=int, default=2, help="grid runs side by side (one XLA thread each when > 1)")
    parser.add_argument("--steps", default="reward,sft,pairs,tune,runs,evaluate,report",
                        help="which steps to run, in order (e.g. 'evaluate,report' for a report of the runs so far)")
    a = parser.parse_args()
    a.train_csv, a.test_csv = (os.path.join(a.data, f) for f in ("train.csv.gz", "test_public.csv.gz"))
    for path in (a.train_csv, a.test_csv):
        if not os.path.exists(path):
            raise SystemExit(f"error: {path} not found (pass --data=DIR holding the IMDb CSVs)")
    size = dict(QUICK if a.quick else FULL, middle_only=a.middle_only)
    if a.seeds:
        size["seeds"] = tuple(int(x) for x in a.seeds.split(","))
    methods = (tuple(METHODS) if a.methods == "all" else a.methods.split(",") if a.methods
               else QUICK_METHODS if a.quick else DEFAULT_METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"error: --methods: unknown {','.join(unknown)} (choose from {','.join(METHODS)} or all)")
    os.makedirs(os.path.join(a.out, "runs"), exist_ok=True)
    steps = {"reward": lambda: step_reward(a, size), "sft": lambda: step_sft(a, size),
             "pairs": lambda: step_pairs(a, size), "tune": lambda: step_tune(a, size, methods), "runs": lambda: step_runs(a, size, methods),
             "evaluate": lambda: step_evaluate(a, size, methods), "report": lambda: step_report(a, size, methods)}
    for name in a.steps.split(","):
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        steps[name]()
        print(f"== {name} done in {time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
