"""The IMDb benchmark pipeline at toy size (`tools/ablate.py --quick`): every step runs, each method trains at
the learning rate that won on the validation pairs, the report holds each method, and a rerun redoes nothing."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pipeline(out, data):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run([sys.executable, "tools/ablate.py", "--task=imdb_sentiment", "--quick", f"--out={out}",
                           f"--data={data}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_quick_pipeline_runs_every_step_and_resumes(tmp_path, shared_data):
    out, data = tmp_path / "toy", os.path.join(shared_data, "imdb")
    first = _pipeline(out, data)
    pairs = json.loads((out / "pairs.json").read_text())
    assert pairs["prefixes"]["train"] > 0 and pairs["pairs"]["train"] > 0 and pairs["pairs"]["test"] > 0
    with open(out / "train_pairs.jsonl") as f:
        row = json.loads(f.readline())
    assert set(row) == {"prompt", "chosen", "rejected"} and row["chosen"] != row["rejected"]
    report = json.loads((out / "ablation.json").read_text())
    assert {r["method"] for r in report["rows"]} == {"dpo", "convex_margin"}
    for r in report["rows"]:
        assert r["kl"]["lo"] <= r["kl"]["mean"] <= r["kl"]["hi"] and "mean" in r["reward"]
    tuned = json.loads((out / "tuned_lr.json").read_text())  # each method at its best validation rate
    for r in report["rows"]:
        accuracy = tuned["validation_accuracy"][r["method"]]
        assert set(accuracy) == {"0.0001", "0.0003"} and accuracy[f"{r['learning_rate']:g}"] == max(accuracy.values())
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "] trained and evaluated" in first
    second = _pipeline(out, data)  # resumed: every step finds its output and skips
    assert "] trained" not in second and "] evaluated" not in second
