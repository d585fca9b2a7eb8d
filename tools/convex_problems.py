"""Write the convex CPU peer's gated-ReLU problems as .npz files for `tools/bench_admm.py --problem`.

    python tools/convex_problems.py --out=problems                 # the five benchmark cells
    python tools/convex_problems.py --out=problems --cells=squared:10000:32:64

The generator follows the peer's description (not its code): X ~ N(0, 1) / sqrt(d)
from seed 0; from the same stream a planted two-layer ReLU teacher of 8 units with
alternating output signs gives y = sign(teacher(X)), then 10% of the labels are
flipped; the gate directions G ~ N(0, I) come from seed 1234. Each file holds
`X` [n, d], `y` [n], `G` [d, P], `lam`, `loss` and `f_star`, the objective in the
contract's 1/n scaling (see bench_admm.py).

f_star is our own ADMM run long: its final objective after reaching a certified
relative duality gap of `--gap` (or after `--max_iter` iterations).
The file also keeps `f_lower`, the certified lower bound of that run, and
`f_star_source`, a sentence saying so.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

TEACHER_WIDTH = 8
FLIP = 0.10
CELLS = ("squared:10000:32:64", "squared:100000:32:64", "squared:10000:128:256", "squared:100000:128:64",
         "logistic:10000:32:64")


def make_problem(n: int, d: int, P: int, seed: int = 0, gate_seed: int = 1234):
    """(X, y, G) of the peer's problem: scaled Gaussian X, a noisy planted ReLU teacher, Gaussian gates."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)) / np.sqrt(d)
    teacher = rng.standard_normal((d, TEACHER_WIDTH))
    out_signs = np.where(np.arange(TEACHER_WIDTH) % 2 == 0, 1.0, -1.0)
    y = np.where(np.maximum(X @ teacher, 0.0) @ out_signs >= 0, 1.0, -1.0)
    y[rng.random(n) < FLIP] *= -1.0
    G = np.random.default_rng(gate_seed).standard_normal((d, P))
    return X, y, G


def reference_optimum(X, y, G, lam, loss, gap, max_iter):
    """(f_star, certified lower bound) in the contract's 1/n scaling, from a long run of our ADMM."""
    from tools.bench_admm import solve_problem

    run = solve_problem(X, y, G, lam, loss, gap_tol=gap, max_iter=max_iter)
    return run["objective"], run["lower_bound"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the .npz files")
    parser.add_argument("--cells", default=",".join(CELLS), help="loss:n:d:P,... (lambda is --lam)")
    parser.add_argument("--lam", type=float, default=1e-3)
    parser.add_argument("--gap", type=float, default=1e-11, help="relative duality gap of the f_star run")
    parser.add_argument("--max_iter", type=int, default=20_000)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for cell in args.cells.split(","):
        loss, n, d, P = cell.split(":")
        n, d, P = int(n), int(d), int(P)
        X, y, G = make_problem(n, d, P)
        f_star, lower = reference_optimum(X, y, G, args.lam, loss, args.gap, args.max_iter)
        path = os.path.join(args.out, f"{loss}_{n}_{d}_{P}.npz")
        np.savez(path, X=X, y=y, G=G, lam=args.lam, loss=loss, f_star=f_star, f_lower=lower,
                 f_star_source=f"cvxdpo ADMM run to a relative duality gap of {args.gap:g} or {args.max_iter} "
                               "iterations (float64), final objective")
        print(f"{path}: f_star={f_star:.15g} certified gap {(f_star - lower) / f_star:.1e}", flush=True)


if __name__ == "__main__":
    main()
