"""launch.evaluate end to end on small trained models: its numbers equal a direct forward pass, the
reference and KL behave as they must for identical models, the survey round trip, one-line errors."""

import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvxdpo.data.tokenizer import load_tokenizer
from cvxdpo.model import hub
from cvxdpo.train.trainer import Trainer
from tiny_config import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pairs):
    """Two tiny models trained on the tiny pairs: an SFT run and a DPO run from it."""
    base = tmp_path_factory.mktemp("runs")
    sft = get_config(pairs)
    sft.train.update(method="sft", steps=4)
    Trainer(sft, str(base / "sft"), devices=jax.devices()[:1]).run()
    dpo = get_config(pairs)
    dpo.train.update(steps=4, init_from=str(base / "sft"))
    Trainer(dpo, str(base / "dpo"), devices=jax.devices()[:1]).run()
    return str(base / "sft"), str(base / "dpo")


def _evaluate(*flags, check=True):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run([sys.executable, "-m", "launch.evaluate", *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _direct_logps(model_dir: str, rows: list[dict]) -> np.ndarray:
    """Summed response log-probs of [chosen, rejected] per row: one unpadded forward pass per sequence."""
    model = hub.load_pretrained(os.path.join(model_dir, "hf"))
    tok = load_tokenizer(os.path.join(model_dir, "hf"))
    out = []
    for row in rows:
        prompt = tok.encode(row["prompt"])
        pair = []
        for response in (row["chosen"], row["rejected"]):
            resp = tok.encode(response) + [tok.eos_id]
            ids = jnp.asarray([prompt + resp])
            logp = jax.nn.log_softmax(model(ids, jnp.ones_like(ids)).logits[0].astype(jnp.float32), -1)
            targets = ids[0, len(prompt):]
            pair.append(float(logp[len(prompt) - 1:-1][jnp.arange(len(resp)), targets].sum()))
        out.append(pair)
    return np.asarray(out)


def test_evaluate_equals_a_direct_forward_pass(tmp_path, runs, pairs):
    sft, dpo = runs
    out = tmp_path / "eval"
    _evaluate(f"--model={dpo}", f"--reference={dpo}", "--data_source=jsonl", f"--data_path={pairs}",
              f"--out={out}", "--samples=2", "--temperatures=1.0", "--max_new_tokens=6", "--max_prompts=5")
    result = json.loads((out / "eval.json").read_text())
    with open(pairs) as f:
        rows = [json.loads(line) for line in f]
    assert result["n_pairs"] == len(rows) and result["n_skipped"] == 0
    direct = _direct_logps(dpo, rows)
    assert result["accuracy"]["raw"]["mean"] == pytest.approx(np.mean(direct[:, 0] > direct[:, 1]))
    assert result["logps"]["chosen"]["mean"] == pytest.approx(direct[:, 0].mean(), rel=1e-4)
    assert result["logps"]["rejected"]["mean"] == pytest.approx(direct[:, 1].mean(), rel=1e-4)
    acc = result["accuracy"]["raw"]
    assert acc["lo"] <= acc["mean"] <= acc["hi"] and acc["hi"] - acc["lo"] > 0
    # The reference is the model itself: every implicit reward is 0 (strict > never holds), every KL term 0.
    assert result["accuracy"]["reference_adjusted"]["mean"] == 0.0
    sampling = result["sampling"]["temperature_1"]
    assert sampling["kl"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0}
    assert 0 < sampling["distinct_1"] <= 1 and sampling["length"]["mean"] <= 6
    assert "| raw |" in (out / "eval.md").read_text()


def test_max_pairs_is_a_random_subset(tmp_path, runs, pairs):
    _, dpo = runs
    for seed in (0, 1):
        _evaluate(f"--model={dpo}", "--data_source=jsonl", f"--data_path={pairs}", f"--out={tmp_path / str(seed)}",
                  "--max_pairs=20", f"--seed={seed}")
    a, b = (json.loads((tmp_path / s / "eval.json").read_text()) for s in ("0", "1"))
    assert a["n_pairs"] == b["n_pairs"] == 20
    assert a["logps"]["chosen"]["mean"] != b["logps"]["chosen"]["mean"]  # different random subsets


def test_survey_export_and_tally(tmp_path, runs, pairs):
    sft, dpo = runs
    out = tmp_path / "survey"
    _evaluate(f"--model={sft}", f"--model={dpo}", "--data_source=jsonl", f"--data_path={pairs}", f"--out={out}",
              "--max_pairs=10", "--survey=4", "--max_new_tokens=5")
    key = json.loads((out / "answer_key.json").read_text())
    with open(out / "survey.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4
    for row in table:  # the evaluator always picks the DPO model's answer
        row["choice"] = next(letter for letter, model in key["questions"][row["question_id"]].items() if model == dpo)
    with open(tmp_path / "filled.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    proc = _evaluate(f"--tally={tmp_path / 'filled.csv'}", f"--answer_key={out / 'answer_key.json'}")
    assert f"| {dpo} | 4 | 100.0 |" in proc.stdout


def test_bad_input_is_one_line(tmp_path, runs):
    _, dpo = runs
    proc = _evaluate(f"--model={dpo}", "--data_source=jsonl", f"--data_path={tmp_path / 'missing.jsonl'}",
                     f"--out={tmp_path / 'x'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "missing.jsonl" in proc.stderr.strip().splitlines()[-1]
