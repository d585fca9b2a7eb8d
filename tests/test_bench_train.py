"""tools/bench_train.py and tools/gpu_bench.sh at a toy size: every row's numbers follow from its own
measurements by the documented formulas (tokens, MFU, the SHP epoch projection), for each benchmarked method."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("dpo", "dpo_precomputed", "dpo_convex")
TOY = dict(batch=2, length=32)  # tools/gpu_bench.sh's BENCH_TOY size


@pytest.fixture(scope="module")
def gpu_bench_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_bench")
    env = {**os.environ, "BENCH_TOY": "1", "XLA_FLAGS": ""}  # one device, as a single-accelerator user has
    proc = subprocess.run(["bash", "tools/gpu_bench.sh", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| tiny | dpo_convex | cvxdpo |" in proc.stdout and "SHP epoch (h)" in proc.stdout
    return {name: json.load(open(out / f"{name}.json"))["rows"] for name in ("gpu_bench", "gpu_bench_shp")}


def _model_flops_per_token(row):
    return (6 + (2 if row["method"] == "dpo" else 0)) * row["params"]  # the frozen reference's forward: 2N


def test_synthetic_rows_follow_from_their_measurements(gpu_bench_rows):
    rows = {r["method"]: r for r in gpu_bench_rows["gpu_bench"]}
    assert sorted(rows) == sorted(METHODS)
    for method, r in rows.items():
        tokens = 2 * TOY["batch"] * TOY["length"]  # B pairs = 2B sequences of `length` real tokens
        assert r["tokens_per_s"] * r["step_s"] == pytest.approx(tokens, rel=1e-9)
        mfu = _model_flops_per_token(r) * tokens / r["step_s"] / (r["matmul_peak_gflops"] * 1e9)
        assert r["mfu"] == pytest.approx(mfu, rel=1e-9)
        assert r["timed_steps"] == 2 and r["compile_s"] > 0 and r["peak_rss_gb"] >= r["state_rss_gb"] > 0
    convex = rows["dpo_convex"]
    assert convex["refit_s"] > 0  # the ADMM refit, timed alone on a full buffer and spread over refresh_every
    assert convex["admm_share"] == pytest.approx(convex["refit_s"] / (convex["refresh_every"] * convex["step_s"]))


def test_shp_rows_project_an_epoch_from_their_buckets(gpu_bench_rows):
    for r in gpu_bench_rows["gpu_bench_shp"]:
        buckets = r["bucket_steps"]
        assert sum(b["share"] for b in buckets.values()) == pytest.approx(1.0)
        assert all(int(L) <= 32 for L in buckets)  # --max_length=32: nothing longer is ever padded to
        assert r["step_s"] == pytest.approx(sum(b["share"] * b["step_s"] for b in buckets.values()))
        assert r["epoch_hours"] == pytest.approx(math.ceil(348_718 / TOY["batch"]) * r["step_s"] / 3600)
        assert 0 < r["real_token_fraction"] <= 1
        assert "assumed" in r["length_source"]  # no SHP files given: the length model says it is one


def test_bad_method_is_one_line():
    proc = subprocess.run([sys.executable, "tools/bench_train.py", "--method=dpo,sgd"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "bench_train: unknown method 'sgd'; one of sft, dpo, dpo_precomputed, dpo_convex, " \
                                  "simpo, ipo"
