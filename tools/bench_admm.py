"""Time to a relative suboptimality on a fixed problem: cvxdpo's ADMM, alone or side by side with scnn.

    python tools/convex_problems.py --out=problems              # the peer's problems as .npz files
    python tools/bench_admm.py --problem=problems/squared_10000_32_64.npz --tol=1e-6 --json=out.json \\
        [--weights=W.npy] [--stop=target|certificate]
    python tools/bench_admm.py --problem=problems/squared_10000_32_64.npz,... --peer=scnn [--repeats=2]

A problem file holds X [n, d], y [n] (+-1), G [d, P] (gate i is D_i = diag(1[X G[:, i] >= 0])), the
scalars lam, loss ("squared" or "logistic") and f_star. Its objective is the benchmark contract's, with
1/n scaling:

    squared:  (1/(2n)) ||sum_i D_i X w_i - y||^2 + lam sum_i ||w_i||_2
    logistic: (1/n) sum_j log(1 + exp(-y_j (F w)_j)) + lam sum_i ||w_i||_2

cvxdpo's solver minimizes the summed loss + beta sum_i ||w_i||_2, which is n times that objective with
beta = n * lam: the tool passes beta = n * lam and divides the solver's objective by n, so every number it
prints or writes is in the contract's scaling.

time_s is the wall time of one compiled solve that stops at the first check where
(f - f_star) / |f_star| <= tol (--stop=target), or where its own duality-gap certificate proves
that bound without knowing f_star (--stop=certificate); compilation and a warm-up call are excluded.
The JSON holds {"time_s", "iterations", "objective", "rel_subopt", "threads"} and, for the certificate,
"certified_gap" (an upper bound on rel_subopt). --weights saves the solution [d, P]. A target run also stops
if it certifies a 1e-13 gap first (it never does at tol >= 1e-10), which spares it the residual test, and
it runs with normalize_steps=0 (its certified_gap is then the plain, looser one).

The solver runs with its defaults (float64 iterates, float32 CG passes, the shared preconditioner, 2 CG
steps per iteration). --admm KEY=VALUE (repeatable) overrides any admm.ADMMConfig field for a lever
measurement, e.g. --admm pass_dtype=None --admm preconditioner=jacobi; the overrides go into the JSON.

--peer=scnn runs scnn's R-FISTA (pyscnn 0.0.10) on the same problems, alternating ours and scnn's
runs (A B A B ...) so that both see the same machine load, and prints a table of the median times and
their ratio. scnn's time is its own per-iteration timer (metric collection excluded) at the first
iteration whose objective is within tol of f_star; its first run finds that iteration, the later
ones stop right after it (its iterates are deterministic).

Threads: --threads (default 2) pins the process to that many cores and sizes the XLA and OpenBLAS
thread pools alike, before either library is imported, so both solvers get the same threads.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import time


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", required=True, help="a .npz problem file, or several separated by commas")
    parser.add_argument("--tol", type=float, default=1e-6, help="relative suboptimality to reach")
    parser.add_argument("--stop", choices=("target", "certificate"), default="target",
                        help="stop on the known f_star (target) or on ADMM's own duality gap (certificate)")
    parser.add_argument("--json", default=None, help="write the result(s) here")
    parser.add_argument("--weights", default=None, help="save ADMM's solution [d, P] here (.npy; one problem)")
    parser.add_argument("--peer", choices=("scnn",), default=None, help="also time this solver, alternating")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs of each solver per problem (time_s is their median; the runs are identical)")
    parser.add_argument("--threads", type=int, default=2, help="cores and BLAS/XLA threads for both solvers")
    parser.add_argument("--max_iter", type=int, default=100_000)
    parser.add_argument("--admm", action="append", default=[], metavar="KEY=VALUE",
                        help="override an admm.ADMMConfig field (Python literal or None), repeatable")
    parser.add_argument("--scnn_max_iter", type=int, default=400, help="iterations of scnn's first run")
    return parser


def _pin_threads(threads: int) -> None:
    """Same cores and thread pools for XLA and OpenBLAS; must run before numpy or jax is imported."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}").strip()


if __name__ == "__main__":
    _ARGS = _parser().parse_args()
    _pin_threads(_ARGS.threads)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

from cvxdpo.convex import admm  # noqa: E402
from cvxdpo.convex import gated_relu as gr  # noqa: E402

# --stop=target: the run stops on the target, or (never first in practice) on a certified gap this small,
# so that the residual stopping test, which target runs do not need, is not evaluated either; and it keeps
# only the plain certificate (the normalized dual point, which only a certified stop needs, costs a pass).
TARGET_GAP_TOL = 1e-13
TARGET_OVERRIDES = {"normalize_steps": 0}
SCNN_MISSING = ("scnn is not installed: pip install --no-deps pyscnn==0.0.10 linalg_backends "
                "(beside torch, numpy, scipy and opt_einsum)")


def load_problem(path: str) -> dict:
    with np.load(path) as f:
        return {"X": f["X"], "y": f["y"], "G": f["G"], "lam": float(f["lam"]), "loss": str(f["loss"]),
                "f_star": float(f["f_star"]), "name": os.path.splitext(os.path.basename(path))[0]}


def parse_overrides(pairs: list[str]) -> dict:
    """["pass_dtype=None", "rho=0.3"] -> {"pass_dtype": None, "rho": 0.3}; plain words stay strings."""
    fields = {f.name for f in dataclasses.fields(admm.ADMMConfig)}
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in fields:
            sys.exit(f"--admm {pair!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(fields))}")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


class Admm:
    """One problem compiled once; each call times a solve from a cold start (contract scaling in and out)."""

    def __init__(self, X, y, G, lam, loss, gap_tol=0.0, max_iter=100_000, overrides=None):
        n, d = X.shape
        self.n, self.P = n, G.shape[1]
        self.cfg = admm.ADMMConfig(**{"loss": loss, "beta": n * lam, "max_iter": max_iter, "gap_tol": gap_tol,
                                      **(overrides or {})})
        self.args = (jnp.asarray(X), jnp.asarray(y), gr.masks(jnp.asarray(X), jnp.asarray(G)), jnp.ones(self.P))
        self.state0 = admm.init_state(n, d, self.P, "gated", self.cfg.rho, jnp.float64)
        solver = admm.make_solver(self.cfg)
        self.compiled = solver.lower(*self.args, self.state0, 0.0).compile()
        self(target=np.inf)  # warm-up: stops at the first check

    def __call__(self, target=-np.inf) -> dict:
        """target: stop once the contract objective is at most this (default: only the certificate or max_iter)."""
        t = time.perf_counter()
        state, info = self.compiled(*self.args, self.state0, self.n * target)
        jax.block_until_ready(state)
        seconds = time.perf_counter() - t
        info = jax.device_get(info)
        return {"time_s": seconds, "iterations": int(info.iterations), "cg_iterations": int(info.cg_iterations),
                "objective": float(info.objective) / self.n, "lower_bound": float(info.lower_bound) / self.n,
                "status": admm.STATUS[int(info.status)], "weights": np.asarray(state.v)}


def solve_problem(X, y, G, lam, loss, gap_tol, max_iter) -> dict:
    """A long certified run (tools/convex_problems.py's f_star): objective and lower bound, contract scaling."""
    return Admm(X, y, G, lam, loss, gap_tol=gap_tol, max_iter=max_iter)()


def solver_overrides(args) -> dict:
    """The ADMMConfig fields this run sets beyond the problem's: the stop mode's, then --admm's."""
    return {**(TARGET_OVERRIDES if args.stop == "target" else {}), **parse_overrides(args.admm)}


def run_ours(prob: dict, args, solver: Admm | None = None) -> tuple[dict, Admm]:
    f_star = prob["f_star"]
    if solver is None:
        solver = Admm(prob["X"], prob["y"], prob["G"], prob["lam"], prob["loss"],
                      gap_tol=TARGET_GAP_TOL if args.stop == "target" else args.tol, max_iter=args.max_iter,
                      overrides=solver_overrides(args))
    out = solver(f_star + args.tol * abs(f_star) if args.stop == "target" else -np.inf)
    out["rel_subopt"] = (out["objective"] - f_star) / abs(f_star)
    out["certified_gap"] = (out["objective"] - out["lower_bound"]) / abs(out["objective"])
    return out, solver


def run_scnn(prob: dict, tol: float, max_iter: int) -> dict:
    """R-FISTA for max_iter iterations; time and iteration of the first objective within tol of f_star."""
    from scnn.metrics import Metrics
    from scnn.models import ConvexGatedReLU
    from scnn.optimize import optimize_model
    from scnn.regularizers import NeuronGL1
    from scnn.solvers import RFISTA

    model = ConvexGatedReLU(prob["G"])
    _, metrics = optimize_model(model, RFISTA(model, max_iters=max_iter, tol=1e-16), Metrics(metric_freq=1),
                                prob["X"], prob["y"], regularizer=NeuronGL1(prob["lam"]), unitize_data=False,
                                return_convex=True, dtype="float64")
    objective, times = np.asarray(metrics.objective, float), np.asarray(metrics.time, float)
    hit = np.nonzero((objective - prob["f_star"]) / abs(prob["f_star"]) <= tol)[0]
    if not hit.size:
        return {"time_s": None, "iterations": None, "status": f"not within {tol:g} in {max_iter} iterations"}
    k = int(hit[0])
    return {"time_s": float(times[k]), "iterations": k, "objective": float(objective[k]), "status": "reached"}


def side_by_side(problems: list[dict], args) -> list[dict]:
    if importlib.util.find_spec("scnn") is None:
        sys.exit(SCNN_MISSING)
    rows = []
    print(f"| problem | ADMM s (it) | scnn R-FISTA s (it) | ADMM / scnn |  ({args.threads} threads, tol {args.tol:g},"
          f" stop={args.stop})\n|---|---|---|---|", flush=True)
    for prob in problems:
        ours, theirs, solver, scnn_iters = [], [], None, args.scnn_max_iter
        for _ in range(args.repeats):  # A B A B: both see the same load
            result, solver = run_ours(prob, args, solver)
            ours.append(result)
            theirs.append(run_scnn(prob, args.tol, scnn_iters))
            if theirs[-1]["iterations"] is not None:
                scnn_iters = theirs[-1]["iterations"] + 1
        a = statistics.median(r["time_s"] for r in ours)
        b = statistics.median(r["time_s"] for r in theirs) if theirs[0]["time_s"] is not None else None
        row = {"problem": prob["name"], "threads": args.threads, "tol": args.tol, "stop": args.stop,
               "admm_s": [r["time_s"] for r in ours], "admm_iterations": ours[0]["iterations"],
               "admm_rel_subopt": ours[-1]["rel_subopt"], "admm_certified_gap": ours[-1]["certified_gap"],
               "scnn_s": [r["time_s"] for r in theirs], "scnn_iterations": theirs[0]["iterations"],
               "scnn_status": theirs[0]["status"], "ratio": a / b if b else None,
               "admm_overrides": solver_overrides(args)}
        rows.append(row)
        ratio = f"{row['ratio']:.2f}" if b else theirs[0]["status"]
        scnn_cell = f"{b:.2f} ({theirs[0]['iterations']})" if b else "-"
        print(f"| {prob['name']} | {a:.2f} ({ours[0]['iterations']}) | {scnn_cell} | {ratio} |", flush=True)
    return rows


def main(args):
    problems = [load_problem(p) for p in args.problem.split(",")]
    if args.peer:
        report = side_by_side(problems, args)
    else:
        report = []
        for prob in problems:
            result, solver = run_ours(prob, args)
            times = [result["time_s"]] + [run_ours(prob, args, solver)[0]["time_s"] for _ in range(args.repeats - 1)]
            if args.weights:
                np.save(args.weights, result["weights"])
            report.append({k: result[k] for k in ("iterations", "objective", "rel_subopt", "certified_gap",
                                                   "cg_iterations", "status")}
                          | {"time_s": statistics.median(times), "times_s": times, "threads": args.threads,
                             "problem": prob["name"], "stop": args.stop, "admm_overrides": solver_overrides(args)})
            print(json.dumps(report[-1]), flush=True)
        report = report[0] if len(report) == 1 else report
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main(_ARGS)
