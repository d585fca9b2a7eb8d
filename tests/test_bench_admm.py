"""tools/convex_problems.py and tools/bench_admm.py on small problems of the benchmark's family: the files'
f_star is the optimum cvxpy finds independently, the tool's JSON follows the contract (its objective is the
contract's formula evaluated on the saved weights), a target run reaches the tolerance, and a certified run
proves a gap that bounds the true suboptimality, for both losses."""

import json
import os
import subprocess
import sys

import cvxpy as cp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, D, P = 1000, 8, 16
LOSSES = ("squared", "logistic")


def _run(*args, check=True):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    out = tmp_path_factory.mktemp("problems")
    _run("tools/convex_problems.py", f"--out={out}", f"--cells=squared:{N}:{D}:{P},logistic:{N}:{D}:{P}",
         "--gap=1e-10")
    return {loss: dict(np.load(out / f"{loss}_{N}_{D}_{P}.npz")) | {"path": str(out / f"{loss}_{N}_{D}_{P}.npz")}
            for loss in LOSSES}


def contract_objective(prob, W):
    """The benchmark contract's objective, written from its text: 1/n scaling, masks from X G >= 0."""
    X, y, G, lam = prob["X"], prob["y"], prob["G"], float(prob["lam"])
    f = np.sum((X @ G >= 0) * (X @ W), axis=1)
    loss = 0.5 * np.mean((f - y) ** 2) if str(prob["loss"]) == "squared" else np.mean(np.logaddexp(0, -y * f))
    return loss + lam * np.linalg.norm(W, axis=0).sum()


def cvxpy_optimum(prob):
    X, y, G, lam = prob["X"], prob["y"], prob["G"], float(prob["lam"])
    W = cp.Variable((D, P))
    f = cp.sum(cp.multiply((X @ G >= 0).astype(float), X @ W), axis=1)
    loss = (0.5 * cp.sum_squares(f - y) if str(prob["loss"]) == "squared"
            else cp.sum(cp.logistic(-cp.multiply(y, f)))) / N
    problem = cp.Problem(cp.Minimize(loss + lam * cp.sum(cp.norm(W, 2, axis=0))))
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    return problem.value


@pytest.mark.parametrize("loss", LOSSES)
def test_problem_files_hold_the_independent_optimum(problems, loss):
    prob = problems[loss]
    assert prob["X"].shape == (N, D) and prob["G"].shape == (D, P) and set(np.unique(prob["y"])) == {-1.0, 1.0}
    f_star, f_lower = float(prob["f_star"]), float(prob["f_lower"])
    assert f_lower <= f_star and (f_star - f_lower) / f_star <= 1e-10  # certified by the long run itself
    assert abs(f_star - cvxpy_optimum(prob)) <= 1e-7 * f_star


@pytest.mark.parametrize("loss", LOSSES)
def test_target_run_follows_the_contract(problems, loss, tmp_path):
    prob = problems[loss]
    _run("tools/bench_admm.py", f"--problem={prob['path']}", "--tol=1e-6", f"--json={tmp_path / 'out.json'}",
         f"--weights={tmp_path / 'W.npy'}")
    out = json.load(open(tmp_path / "out.json"))
    assert {"time_s", "iterations", "objective", "rel_subopt", "threads"} <= set(out)
    assert out["time_s"] > 0 and out["threads"] == 2 and out["iterations"] > 0
    W = np.load(tmp_path / "W.npy")
    assert W.shape == (D, P)
    f_star = float(prob["f_star"])
    assert contract_objective(prob, W) == pytest.approx(out["objective"], rel=1e-12)
    assert out["rel_subopt"] == pytest.approx((out["objective"] - f_star) / f_star, rel=1e-9, abs=1e-15)
    assert out["rel_subopt"] <= 1e-6


@pytest.mark.parametrize("loss", LOSSES)
def test_certified_run_bounds_the_true_suboptimality(problems, loss, tmp_path):
    prob = problems[loss]
    _run("tools/bench_admm.py", f"--problem={prob['path']}", "--tol=1e-6", "--stop=certificate",
         f"--json={tmp_path / 'out.json'}")
    out = json.load(open(tmp_path / "out.json"))
    assert out["status"] == "converged"
    assert out["rel_subopt"] <= out["certified_gap"] <= 1e-6


def test_missing_peer_and_bad_override_are_one_line_errors(problems):
    hide_scnn = ("import importlib.util, runpy, sys; real = importlib.util.find_spec; "
                 "importlib.util.find_spec = lambda name, *a: None if name == 'scnn' else real(name, *a); "
                 "sys.argv = ['tools/bench_admm.py', sys.argv[1], '--peer=scnn']; "
                 "runpy.run_path('tools/bench_admm.py', run_name='__main__')")
    proc = _run("-c", hide_scnn, f"--problem={problems['squared']['path']}", check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "scnn is not installed: pip install --no-deps pyscnn==0.0.10 linalg_backends "
        "(beside torch, numpy, scipy and opt_einsum)"]
    proc = _run("tools/bench_admm.py", f"--problem={problems['squared']['path']}", "--admm", "rho", check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "--admm 'rho': expected KEY=VALUE" in proc.stderr
