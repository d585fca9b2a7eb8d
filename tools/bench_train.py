"""Training-step throughput, peak memory and MFU of every method, on synthetic pairs or SHP's length profile.

    python tools/bench_train.py --model=distilgpt2 --method=dpo --length=256 --batch=4 --steps=6 --json=OUT.json
    python tools/bench_train.py --model=gpt2 --method=dpo,dpo_convex --data=shp --json=shp.json
    python tools/bench_train.py --model=distilgpt2 --method=dpo --peer=trl --peer_python=PY --json=side.json

Every (model, method) runs in its own process, so its peak memory is its own. The model is randomly
initialized (`model.init=scratch`): the step's cost does not depend on the weights. `--data=synthetic` (the
default) feeds pairs whose prompt is length/2 tokens and each response length/2 tokens, with no padding, so
the work per step is fixed and equals the peer scripts' (TRL pads its responses to the longest of a batch,
drawn from [length/2 - 8, length/2]). A method reads B pairs = 2B sequences of `length` tokens per step (SFT:
B sequences of prompt + chosen).

Reported per row: `step_s`, the median of the timed steps after `--warmup` untimed ones (DPO-Convex: plus its
ADMM refit on a full buffer, timed alone and spread over `anchor.refresh_every` steps, the way it runs in
training); `tokens_per_s` = real tokens per step / step_s; `peak_rss_gb` from the OS (the process's
high-water mark; on an accelerator also `peak_device_gb` from the device's memory stats); `compile_s`, the
first step's time (tracing and compilation); `mfu` = model FLOPs / step_s / `matmul_peak_gflops`, with model
FLOPs = 6 N per trained token + 2 N per reference-forward token (N = parameters, the tied embedding counted
once; attention's own FLOPs are left out as in the usual 6N rule) and the peak measured in the same process
as the best of a large float matmul in the compute dtype.

`--data=shp` replaces the fixed shape by SHP's: pair lengths (post, two comments) come from real SHP files in
the hub's layout when `--shp_path` is given (GPT-2 tokens, truncated by the pipeline's rule to
`--max_length`/`--max_prompt_length`), else from a stated length model (below, labelled in the output);
batches are padded to the pipeline's length buckets and every bucket is timed; tokens/s counts real tokens
only; the row adds the projected time and peak memory of one SHP epoch (348,718 train pairs).

`--peer=trl|plain|both` runs the peer scripts (TRL's DPOTrainer, a plain eager PyTorch DPO step; in the
peers' folder, see `--peer_dir`) on the same shape in their own Python (`--peer_python`), alternating with
this project's runs (A B A B, `--repeats` rounds), and prints the ratio table from medians of one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

METHODS = {  # method name -> config changes
    "sft": dict(train=dict(method="sft")),
    "dpo": dict(train=dict(method="dpo", reference="frozen")),
    "dpo_precomputed": dict(train=dict(method="dpo", reference="precomputed")),
    "dpo_convex": dict(train=dict(method="dpo_convex")),
    "simpo": dict(train=dict(method="dpo"), loss=dict(name="simpo")),
    "ipo": dict(train=dict(method="dpo", reference="frozen"), loss=dict(name="ipo")),
}
PATH_ARGS = ("peer_python", "peer_dir", "shp_path", "json", "only")
SHP_TRAIN_PAIRS = 348_718  # the SHP card's train rows
SHP_SAMPLE_BATCHES = 4096  # batches drawn from the length profile to weight the buckets' step times
# Without SHP files: token lengths drawn log-normally around the card's example row (post 60 GPT-2 tokens, the
# comments 78 and 70), with a spread (sigma 1) that gives SHP's long tail (posts of several thousand tokens
# exist; the card recommends truncating to 512). A stated assumption, not SHP's measured distribution.
SHP_LENGTH_MODEL = dict(post_median=60, comment_median=74, sigma=1.0)
PEER_METHODS = {"trl": ("bench_trl.py", {"dpo": "dpo", "dpo_precomputed": "dpo_precompute", "sft": "sft"}),
                "plain": ("bench_plain.py", {"dpo": None})}


# ---------------------------------------------------------------- one configuration, in its own process


def _config(args, method: str):
    from cvxdpo.config import default_config

    c = default_config()
    c.mesh = args.mesh
    c.model.update(name=args.model, init="scratch", dtype=args.dtype, remat=args.remat,
                   remat_policy=args.remat_policy, logprob_chunk=args.logprob_chunk)
    c.train.update(batch_size=args.batch, optimizer="rmsprop", learning_rate=1e-6, warmup_steps=1)
    for section, changes in METHODS[method].items():
        c[section].update(changes)
    c.anchor.update(buffer=max(args.batch * 8, 64))
    return c


def _pair_lengths(args, num_pairs: int, rng):
    """(prompt, chosen, rejected) token lengths after the pipeline's truncation, and where they came from."""
    from cvxdpo.data import pipeline

    if args.data == "synthetic":
        half = args.length // 2
        return [(half, half, half)] * num_pairs, "synthetic: prompt = each response = length / 2, no padding"
    cut = pipeline.TokenizeConfig(max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    if args.shp_path:
        raw, source = _shp_token_lengths(args, num_pairs, rng), f"SHP files in {args.shp_path} (GPT-2 tokens)"
    else:
        m = SHP_LENGTH_MODEL
        draw = lambda median: max(1, int(rng.lognormal(math.log(median), m["sigma"])))  # noqa: E731
        raw = [(draw(m["post_median"]), draw(m["comment_median"]) + 1, draw(m["comment_median"]) + 1)
               for _ in range(num_pairs)]
        source = (f"length model (log-normal, medians post {m['post_median']} / comments {m['comment_median']} "
                  f"tokens, sigma {m['sigma']}): assumed, not measured on SHP")
    out = []
    for p, c, r in raw:
        prompt, (chosen, rejected) = pipeline.truncate([0] * p, [[0] * c, [0] * r], cut)
        out.append((len(prompt), len(chosen), len(rejected)))
    return out, source


def _shp_token_lengths(args, num_pairs: int, rng):
    from cvxdpo.data import shp, tokenizer

    tok = tokenizer.load_tokenizer("gpt2")
    pairs = shp.SHPSource(args.shp_path, split="train", max_pairs_per_post=5)
    pick = rng.choice(len(pairs), size=min(num_pairs, len(pairs)), replace=False)
    out = []
    for i in pick:
        pair = pairs[int(i)]
        out.append((len(tok.encode(pair.prompt)), len(tok.encode(pair.chosen)) + 1, len(tok.encode(pair.rejected)) + 1))
    return out


def _bucket(args, pair_lengths) -> int:
    """The padded length of a batch: the fixed length (synthetic), or the pipeline's smallest length bucket
    that holds the batch's longest sequence (SHP)."""
    from cvxdpo.data import pipeline

    if args.data == "synthetic":
        return args.length
    buckets = tuple(int(b) for b in args.buckets.split(",") if b and int(b) < args.max_length)
    cfg = pipeline.TokenizeConfig(max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                                  buckets=buckets)
    longest = max(p + max(c, r) for p, c, r in pair_lengths)
    return next(b for b in cfg.lengths if b >= longest)


def _batch(lengths, L: int, method: str, rng, vocab: int):
    """Arrays of one batch, rows right-padded to L, and its real-token count."""
    import numpy as np

    B, per = len(lengths), 1 if method == "sft" else 2
    ids = rng.integers(0, vocab, size=(B, per, L)).astype(np.int32)
    attn, loss = np.zeros((B, per, L), np.int32), np.zeros((B, per, L), np.int32)
    for b, (p, *responses) in enumerate(lengths):
        for k, n in enumerate(responses[:per]):
            attn[b, k, : p + n], loss[b, k, p: p + n] = 1, 1
    batch = {"input_ids": ids * attn, "attention_mask": attn, "loss_mask": loss,
             "weight": np.ones((B,), np.float32), "ref_logps": -rng.uniform(50, 100, size=(B, 2)).astype(np.float32)}
    if method == "sft":
        batch = {k: (v[:, 0] if v.ndim == 3 else v) for k, v in batch.items()}
    return batch, int(attn.sum())


def _matmul_peak_gflops(dtype: str) -> float:
    """Best of a few large square matmuls in the compute dtype, in GFLOP/s."""
    import jax
    import jax.numpy as jnp

    n = 4096 if jax.default_backend() != "cpu" else 2048
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _peak_memory_gb() -> dict:
    import jax

    out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["peak_device_gb"] = stats["peak_bytes_in_use"] / 2**30
    return out


def measure(args, method: str) -> dict:
    import jax
    import numpy as np

    from cvxdpo import mesh as mesh_lib
    from cvxdpo.model import gpt2
    from cvxdpo.train import anchor, objectives
    from cvxdpo.train import state as state_lib
    from cvxdpo.train import step as step_lib
    from cvxdpo.train.trainer import make_optimizer

    c = _config(args, method)
    objective = objectives.build(c)
    mesh = mesh_lib.make_mesh(c.mesh)
    cfg = gpt2.preset(args.model, dtype=args.dtype, remat=args.remat, remat_policy=args.remat_policy,
                      logprob_chunk=args.logprob_chunk)
    tx, schedule = make_optimizer(c.train)
    graphdef, state, shardings = state_lib.create_train_state(
        cfg, tx, mesh, reference_dtype=objective.reference_dtype, extra=objective.init_extra(cfg.n_embd, 0))
    anchor_cfg = getattr(objective, "anchor_cfg", None)
    if anchor_cfg is not None:  # a full buffer from the start: every refit runs on buffer-many pairs
        state = state.replace(extra=state.extra.replace(pairs_seen=state.extra.pairs_seen * 0 + anchor_cfg.buffer))
    train_step = step_lib.make_train_step(objective, graphdef, tx, mesh, shardings, 1, schedule)
    jax.block_until_ready(state)
    state_rss_gb = _peak_memory_gb()["peak_rss_gb"]  # runtime, parameters, optimizer state (and reference)
    rng = np.random.default_rng(0)
    steps = args.warmup + args.steps
    num_batches = steps if args.data == "synthetic" else SHP_SAMPLE_BATCHES
    lengths, length_source = _pair_lengths(args, args.batch * num_batches, rng)
    batches = [lengths[i * args.batch:(i + 1) * args.batch] for i in range(len(lengths) // args.batch)]
    shapes, seen = {}, {}  # padded length -> [(step seconds, real tokens)], steps run at that length
    compile_s, refit_steps = {}, 0
    plan = batches[:steps] if args.data == "synthetic" else _bucket_plan(batches, args)
    for pair_lengths in plan:
        L = _bucket(args, pair_lengths)
        arrays, real = _batch(pair_lengths, L, method, rng, cfg.vocab_size)
        placed = step_lib.place_batch(arrays, mesh)
        refits = anchor_cfg is not None and (int(state.step) + 1) % anchor_cfg.refresh_every == 0
        t = time.perf_counter()
        state, metrics = train_step(state, placed)
        jax.block_until_ready(metrics)
        dt = time.perf_counter() - t
        seen[L] = seen.get(L, 0) + 1
        if seen[L] == 1:
            compile_s[L] = dt
        elif refits:
            refit_steps += 1  # not a typical step: the refit is timed alone and spread over refresh_every below
        elif seen[L] > args.warmup:
            shapes.setdefault(L, []).append((dt, real))
    row = {"model": args.model, "method": method, "length": args.length, "batch": args.batch, "dtype": args.dtype,
           "remat": args.remat and args.remat_policy, "mesh": args.mesh, "logprob_chunk": args.logprob_chunk,
           "data": args.data, "length_source": length_source, "params": cfg.num_params(), "devices": mesh.size,
           "backend": jax.default_backend(), "compile_s": max(compile_s.values())}
    refit_s = 0.0
    if anchor_cfg is not None:  # the ADMM refit on the full buffer, timed alone
        refit = jax.jit(lambda s: anchor.refit(s, anchor_cfg))
        jax.block_until_ready(refit(state.extra))
        times = []
        for _ in range(3):
            t = time.perf_counter()
            jax.block_until_ready(refit(state.extra))
            times.append(time.perf_counter() - t)
        refit_s = statistics.median(times)
        row.update(refit_s=refit_s, refresh_every=anchor_cfg.refresh_every)
    peak = _matmul_peak_gflops(args.dtype)
    n = cfg.num_params()
    ref_factor = 2 if objective.reference_dtype is not None else 0  # a reference forward on the same tokens
    spread = refit_s / anchor_cfg.refresh_every if anchor_cfg is not None else 0.0
    step_by_shape = {L: statistics.median(dt for dt, _ in v) + spread for L, v in shapes.items()}
    tokens_by_shape = {L: statistics.fmean(r for _, r in v) for L, v in shapes.items()}
    if args.data == "synthetic":
        (L,) = step_by_shape
        step_s, tokens = step_by_shape[L], tokens_by_shape[L]
    else:  # every sampled batch at its bucket's measured step time
        counts = {}
        for pair_lengths in batches:
            L = _bucket(args, pair_lengths)
            counts[L] = counts.get(L, 0) + 1
        total = sum(counts.values())
        step_s = sum(counts[L] * step_by_shape[L] for L in counts) / total
        real = [sum(2 * p + c + r if method != "sft" else p + c for p, c, r in b) for b in batches]
        tokens = statistics.fmean(real)
        epoch_steps = math.ceil(SHP_TRAIN_PAIRS / args.batch)
        row.update(bucket_steps={str(L): {"step_s": step_by_shape[L], "share": counts[L] / total}
                                 for L in sorted(counts)},
                   real_token_fraction=tokens / statistics.fmean(
                       _bucket(args, b) * len(b) * (1 if method == "sft" else 2) for b in batches),
                   epoch_pairs=SHP_TRAIN_PAIRS, epoch_hours=epoch_steps * step_s / 3600)
    flops = (6 + ref_factor) * n * tokens
    row.update(step_s=step_s, tokens_per_s=tokens / step_s, pairs_per_s=args.batch / step_s,
               matmul_peak_gflops=peak, mfu=flops / step_s / (peak * 1e9), refit_steps_excluded=refit_steps,
               timed_steps=sum(len(v) for v in shapes.values()), state_rss_gb=state_rss_gb, **_peak_memory_gb())
    if anchor_cfg is not None:
        row["admm_share"] = refit_s / (anchor_cfg.refresh_every * step_s)
    return row


def _bucket_plan(batches, args):
    """For each bucket SHP's batches fall into: `warmup` + `steps` batches of that bucket (the longest first,
    so the peak memory is the epoch's)."""
    by_bucket = {}
    for b in batches:
        by_bucket.setdefault(_bucket(args, b), []).append(b)
    plan = []
    for L in sorted(by_bucket, reverse=True):
        group = by_bucket[L]
        plan += [group[i % len(group)] for i in range(args.warmup + args.steps)]
    return plan


# ---------------------------------------------------------------- the driver: one process per configuration


def _run_ours(args, model: str, method: str) -> dict:
    cmd = [sys.executable, __file__, f"--only={method}", f"--model={model}"] + [
        f"--{k}={v}" for k, v in vars(args).items()
        if k not in ("only", "model", "method", "json", "peer", "peer_python", "peer_dir", "repeats")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"bench_train: {model} {method} failed: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _prepare_peers(args) -> None:
    """The peers load their random-init models from disk; their own `common.ensure_models` writes them once."""
    code = f"import sys; sys.path.insert(0, {args.peer_dir!r}); import common; common.ensure_models()"
    out = subprocess.run([args.peer_python, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"bench_train: the peers' models could not be written with {args.peer_python}: "
                         f"{(out.stderr.strip().splitlines() or ['no output'])[-1]}")


def _run_peer(args, peer: str, model: str, method: str, out_path: str) -> dict | None:
    script, names = PEER_METHODS[peer]
    if method not in names:
        return None
    cmd = [args.peer_python, os.path.join(args.peer_dir, script), "--model", model, "--seq", str(args.length),
           "--steps", str(args.warmup + args.steps), "--warmup", str(args.warmup), "--bs", str(args.batch),
           "--out", out_path]
    if names[method]:
        cmd[2:2] = ["--method", names[method]]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"bench_train: peer {peer} {model} {method} failed: {out.stderr.strip().splitlines()[-1]}")
    with open(out_path) as f:
        res = json.load(f)
    return {"model": model, "method": method, "peer": peer, "step_s": res["median_step_s"],
            "tokens_per_s": res["real_tokens_per_s"], "peak_rss_gb": res["peak_rss_mb"] / 1024,
            "foreign_cores": res.get("cpu_timed_window", {}).get("foreign_cores")}


def _table(rows) -> str:
    head = "| model | method | who | step s | tokens/s | peak RSS GB | MFU | compile s |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        mfu = f"{100 * r['mfu']:.0f}%" if "mfu" in r else "-"
        comp = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
        lines.append(f"| {r['model']} | {r['method']} | {r.get('peer', 'cvxdpo')} | {r['step_s']:.3f} | "
                     f"{r['tokens_per_s']:.0f} | {r['peak_rss_gb']:.2f} | {mfu} | {comp} |")
    if any("epoch_hours" in r for r in rows):
        lines += ["", "| model | method | SHP epoch (h) | peak RSS GB | real tokens / padded |", "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['method']} | {r['epoch_hours']:.1f} | {r['peak_rss_gb']:.2f} | "
                  f"{r['real_token_fraction']:.2f} |" for r in rows if "epoch_hours" in r]
    return "\n".join(lines)


def _ratios(rows) -> str:
    """Medians over rounds of ours and each peer's, per (model, method): speed and memory ratios."""
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"], r.get("peer", "cvxdpo")), []).append(r)
    lines = ["| model | method | vs | tokens/s ours | tokens/s peer | speed ratio | memory ratio |",
             "|---|---|---|---|---|---|---|"]
    for (model, method, who), peer_rows in groups.items():
        if who == "cvxdpo" or (model, method, "cvxdpo") not in groups:
            continue
        ours = groups[(model, method, "cvxdpo")]
        ot = statistics.median(r["tokens_per_s"] for r in ours)
        pt = statistics.median(r["tokens_per_s"] for r in peer_rows)
        om = statistics.median(r["peak_rss_gb"] for r in ours)
        pm = statistics.median(r["peak_rss_gb"] for r in peer_rows)
        lines.append(f"| {model} | {method} | {who} | {ot:.0f} | {pt:.0f} | {ot / pt:.2f}x | {om / pm:.2f}x |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="distilgpt2", help="comma-separated presets")
    parser.add_argument("--method", default="dpo", help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--steps", type=int, default=6, help="timed steps (per length bucket with --data=shp)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--remat", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                        help="the trainer's default (model.remat)")
    parser.add_argument("--remat_policy", default="dots", help="dots | nothing (with --remat=true)")
    parser.add_argument("--mesh", default="-1,1,1")
    parser.add_argument("--logprob_chunk", type=int, default=32, help="0: full logits (the lever's baseline)")
    parser.add_argument("--data", choices=("synthetic", "shp"), default="synthetic")
    parser.add_argument("--shp_path", default="", help="SHP files in the hub's layout (else the length model)")
    parser.add_argument("--max_length", type=int, default=512, help="--data=shp truncation")
    parser.add_argument("--max_prompt_length", type=int, default=256, help="--data=shp truncation")
    parser.add_argument("--buckets", default="128,256,384", help="--data=shp: the pipeline's length buckets "
                        "(data.buckets; max_length is always one)")
    parser.add_argument("--peer", choices=("none", "trl", "plain", "both"), default="none")
    parser.add_argument("--peer_python", default=os.environ.get("PEER_PYTHON", "python3"),
                        help="a Python with torch and trl (the peers' README says how to make one)")
    parser.add_argument("--peer_dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                           "peers", "trl_cpu"))
    parser.add_argument("--repeats", type=int, default=1, help="rounds of A B (A B ...) with --peer")
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one method, in a child process
    args = parser.parse_args()
    unknown = [m for m in args.method.split(",") if m not in METHODS]
    if unknown:
        raise SystemExit(f"bench_train: unknown method {unknown[0]!r}; one of {', '.join(METHODS)}")
    if args.length % 2 or args.length < 4:
        raise SystemExit(f"bench_train: --length must be even and >= 4, got {args.length}")
    if args.only:
        print(json.dumps(measure(args, args.only)))
        return
    peers = {"none": [], "trl": ["trl"], "plain": ["plain"], "both": ["trl", "plain"]}[args.peer]
    if peers and not os.path.isdir(args.peer_dir):
        raise SystemExit(f"bench_train: no peer scripts in {args.peer_dir} (--peer_dir)")
    if peers:
        _prepare_peers(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.repeats if peers else 1):
            for model in args.model.split(","):
                for method in args.method.split(","):
                    rows.append({**_run_ours(args, model, method), "round": rnd})
                    print(_table(rows[-1:]).splitlines()[-1], flush=True)
                    for peer in peers:
                        res = _run_peer(args, peer, model, method, os.path.join(tmp, f"{peer}.json"))
                        if res:
                            rows.append({**res, "round": rnd})
                            print(_table(rows[-1:]).splitlines()[-1], flush=True)
    print(_table(rows))
    if peers:
        print()
        print(_ratios(rows))
    if args.json:
        with open(args.json, "w") as f:
            settings = {k: v for k, v in vars(args).items() if k not in PATH_ARGS}  # no machine's paths
            json.dump({"args": settings, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
