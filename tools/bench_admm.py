"""Time to a certified optimality gap: cvxdpo's ADMM against scnn (R-FISTA) and cvxpy (Clarabel).

    python tools/bench_admm.py --json=bench_admm.json                       # the default grid
    python tools/bench_admm.py --n=1000,10000 --d=32 --P=16,64 --losses=squared
    python tools/bench_admm.py --per_iteration --devices                   # cost vs n, speed-up vs devices

Each case is a gated-ReLU problem (X ~ N(0, 1), labels from a noisy linear
teacher, beta = 0.01 n). The reference is a certified lower bound L on the
optimum: the dual value at ADMM's solution, whose relative gap is <= 1e-6.
A solver's relative gap is (objective - L) / objective.

- ADMM: time of one jitted solve that stops at a relative duality gap of 1e-6
  (compilation timed separately and excluded).
- scnn R-FISTA (`pip install --no-deps pyscnn linalg_backends`, needs torch):
  its own objective trace (objective is loss/n + lambda * penalty, lambda =
  beta / n), run to tol 1e-10; the time is the trace's first time within 1e-6
  of L. scnn has no logistic loss: those cells say so.
- cvxpy + Clarabel (default tolerances) where the problem fits (n * d * P <=
  --cvxpy_budget); otherwise "too large".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

from cvxdpo.convex import admm  # noqa: E402
from cvxdpo.convex import gated_relu as gr  # noqa: E402

TARGET = 1e-6


def make_problem(n, d, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = np.sign(X @ rng.standard_normal(d) + 0.5 * rng.standard_normal(n))
    return X, y


def run_admm(X, y, P, loss, gap_tol=TARGET, max_iter=100_000, mesh=None, axes=gr.Axes(), iterations=None):
    """(seconds, compile seconds, info, state, problem arrays)."""
    n, d = X.shape
    cfg = admm.ADMMConfig(loss=loss, beta=0.01 * n, max_iter=iterations or max_iter,
                          gap_tol=0.0 if iterations else gap_tol, abs_tol=0.0 if iterations else 1e-8,
                          rel_tol=0.0 if iterations else 1e-7)
    Xj, yj = jnp.asarray(X), jnp.asarray(y)
    M = gr.masks(Xj, gr.sample_gates(0, d, P, jnp.float64))
    signs = jnp.ones(P)
    state = admm.init_state(n, d, P, "gated", cfg.rho, jnp.float64)
    solver = admm.make_solver(cfg, mesh, axes)
    t = time.perf_counter()
    compiled = solver.lower(Xj, yj, M, signs, state).compile()
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    state, info = compiled(Xj, yj, M, signs, state)
    jax.block_until_ready(state)
    return time.perf_counter() - t, compile_s, jax.device_get(info), state, (Xj, yj, M, signs, cfg.beta)


def run_scnn(X, y, P, lower, beta):
    try:
        from scnn.metrics import Metrics
        from scnn.models import ConvexGatedReLU
        from scnn.optimize import optimize_model
        from scnn.regularizers import NeuronGL1
        from scnn.solvers import RFISTA
    except ImportError:
        return {"status": "pyscnn not installed"}
    n, d = X.shape
    gates = np.asarray(gr.sample_gates(0, d, P, jnp.float64))
    model = ConvexGatedReLU(gates)
    t = time.perf_counter()
    _, metrics = optimize_model(model, RFISTA(model, max_iters=20_000, tol=1e-10),
                                Metrics(metric_freq=1, objective=True, time=True, grad_norm=False), X, y,
                                regularizer=NeuronGL1(beta / n), unitize_data=False, dtype="float64",
                                return_convex=True)
    total = time.perf_counter() - t
    objective = np.asarray(metrics.objective) * n
    times = np.asarray(metrics.time)
    gaps = (objective - lower) / objective
    hit = np.nonzero(gaps <= TARGET)[0]
    return {"seconds": float(times[hit[0]]) if hit.size else None, "total_seconds": total,
            "final_gap": float(gaps[-1]), "status": "reached" if hit.size else "did not reach 1e-6"}


def run_cvxpy(X, y, P, loss, lower, beta, budget):
    n, d = X.shape
    if n * d * P > budget:
        return {"status": "too large"}
    import cvxpy as cp

    M = np.asarray(gr.masks(jnp.asarray(X), gr.sample_gates(0, d, P, jnp.float64)))
    U = cp.Variable((d, P))
    f = cp.sum(cp.multiply(M, X @ U), axis=1)
    fit = 0.5 * cp.sum_squares(f - y) if loss == "squared" else cp.sum(cp.logistic(-cp.multiply(y, f)))
    prob = cp.Problem(cp.Minimize(fit + beta * cp.sum(cp.norm(U, 2, axis=0))))
    t = time.perf_counter()
    prob.solve(solver=cp.CLARABEL)
    seconds = time.perf_counter() - t
    gap = (prob.value - lower) / prob.value
    return {"seconds": seconds, "final_gap": float(gap), "status": "reached" if gap <= TARGET else "solved, gap above 1e-6"}


def grid(args):
    rows = []
    for loss in args.losses.split(","):
        for n in map(int, args.n.split(",")):
            for d in map(int, args.d.split(",")):
                X, y = make_problem(n, d)
                for P in map(int, args.P.split(",")):
                    seconds, compile_s, info, state, (Xj, yj, M, signs, beta) = run_admm(X, y, P, loss)
                    primal = float(gr.objective(Xj, yj, M, signs, state.v, beta, loss))
                    lower = float(gr.dual_value(Xj, yj, M, signs, state.z, beta, loss))
                    row = {"loss": loss, "n": n, "d": d, "P": P, "beta": beta,
                           "admm": {"seconds": seconds, "compile_seconds": compile_s,
                                    "iterations": int(info.iterations), "cg_iterations": int(info.cg_iterations),
                                    "final_gap": (primal - lower) / primal, "status": admm.STATUS[int(info.status)]}}
                    row["scnn"] = run_scnn(X, y, P, lower, beta) if loss == "squared" else {"status": "no logistic loss"}
                    row["cvxpy"] = run_cvxpy(X, y, P, loss, lower, beta, args.cvxpy_budget)
                    rows.append(row)
                    print(format_row(row), flush=True)
    return rows


def _cell(result):
    if result.get("seconds") is None:
        return result.get("status", "-")
    return f"{result['seconds']:.2f}"


def format_row(row):
    a, s, c = row["admm"], row["scnn"], row["cvxpy"]
    ratio = f"{s['seconds'] / a['seconds']:.2f}" if s.get("seconds") else "-"
    return (f"| {row['loss']} | {row['n']} | {row['d']} | {row['P']} | {a['seconds']:.2f} ({a['iterations']} it) | "
            f"{_cell(s)} | {ratio} | {_cell(c)} |")


HEADER = ("| loss | n | d | P | ADMM s (iterations) | scnn R-FISTA s | scnn / ADMM | cvxpy s |\n"
          "|---|---|---|---|---|---|---|---|")


def per_iteration(args):
    rows = []
    for n in (1_000, 10_000, 100_000):
        X, y = make_problem(n, 32)
        seconds, _, info, _, _ = run_admm(X, y, 64, "squared", iterations=50)
        rows.append({"n": n, "d": 32, "P": 64, "ms_per_iteration": 1e3 * seconds / int(info.iterations)})
        print(f"| {n} | {rows[-1]['ms_per_iteration']:.2f} |", flush=True)
    return rows


DEVICE_SCRIPT = """
import os, sys, time, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, {root!r})
import jax
jax.config.update("jax_enable_x64", True)
from tools.bench_admm import make_problem, run_admm
from cvxdpo import mesh as mesh_lib
from cvxdpo.convex.gated_relu import Axes
X, y = make_problem(20000, 32)
out = []
for k in (1, 2, 4, 8):
    mesh = mesh_lib.make_mesh(f"1,1,{{k}}", devices=jax.devices()[:k])
    seconds, _, info, _, _ = run_admm(X, y, 256, "squared", mesh=mesh, axes=Axes("tensor"), iterations=30)
    out.append({{"devices": k, "seconds": seconds}})
print(json.dumps(out))
"""


def devices(args):
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    out = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT.format(root=root)], capture_output=True, text=True,
                         check=True, cwd=root)
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    for r in rows:
        r["speedup"] = rows[0]["seconds"] / r["seconds"]
        print(f"| {r['devices']} | {r['seconds']:.2f} | {r['speedup']:.2f} |", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="1000,10000,100000")
    parser.add_argument("--d", default="32,128")
    parser.add_argument("--P", default="16,64,256")
    parser.add_argument("--losses", default="squared,logistic")
    parser.add_argument("--cvxpy_budget", type=float, default=2e7, help="largest n * d * P given to cvxpy")
    parser.add_argument("--skip_grid", action="store_true")
    parser.add_argument("--per_iteration", action="store_true")
    parser.add_argument("--devices", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    report = {}
    if not args.skip_grid:
        print(HEADER)
        report["grid"] = grid(args)
    if args.per_iteration:
        print("| n | ms / ADMM iteration (d=32, P=64) |\n|---|---|")
        report["per_iteration"] = per_iteration(args)
    if args.devices:
        print("| devices | seconds for 30 iterations (n=20000, d=32, P=256) | speed-up |\n|---|---|---|")
        report["devices"] = devices(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
