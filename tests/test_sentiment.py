"""The IMDb sentiment reward: accuracy on real reviews, save/load, stable hashing, the registry, the tool."""

import csv
import functools
import gzip
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cvxdpo.errors import ConfigError, DataError, MissingFileError
from cvxdpo.eval import rewards, sentiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "sentiment_reward.py")
SENTENCE = "Great movie<br />I didn't expect it!"
# crc32 buckets of SENTENCE's unigrams then bigrams: saved models stay valid only while these never change.
SENTENCE_INDICES = [315999, 979567, 800369, 358637, 176210, 948020, 786387, 456512, 333479, 820267, 76231,
                    789983, 1020901]


def _load_tool():
    spec = importlib.util.spec_from_file_location("sentiment_reward", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sample(path: str, n: int, seed: int) -> tuple[list[str], list[int]]:
    """n seeded random rows (the files are sorted by label, so a head would hold one class)."""
    with gzip.open(path, "rt", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    picked = np.random.default_rng(seed).choice(len(rows), n, replace=False)
    return [rows[i]["text"] for i in picked], [int(rows[i]["label"]) for i in picked]


@functools.cache
def imdb_model(data_dir: str) -> sentiment.SentimentModel:
    """Trained once per session on 4,000 reviews (a few seconds); the tests below share it."""
    return sentiment.train(*sample(os.path.join(data_dir, "imdb", "train.csv.gz"), 4000, seed=0))


def test_beats_080_on_held_out_reviews_after_4000_training_reviews(shared_data):
    texts, labels = sample(os.path.join(shared_data, "imdb", "test_public.csv.gz"), 1000, seed=1)
    assert sentiment.accuracy(imdb_model(shared_data), texts, labels) > 0.8


def test_save_load_round_trip_gives_identical_logits(shared_data, tmp_path):
    model = imdb_model(shared_data)
    texts, _ = sample(os.path.join(shared_data, "imdb", "test_public.csv.gz"), 50, seed=2)
    model.save(str(tmp_path / "m"))
    np.testing.assert_array_equal(sentiment.load(str(tmp_path / "m")).logits(texts), model.logits(texts))
    reward = rewards.get_reward("sentiment", str(tmp_path / "m"))
    np.testing.assert_array_equal(reward(texts), model.logits(texts))


def test_hashing_is_stable_across_processes():
    code = f"from cvxdpo.eval import sentiment; print(sentiment.feature_indices({SENTENCE!r}))"
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONHASHSEED": "12345"}  # a salted hash() would differ
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == sentiment.feature_indices(SENTENCE) == SENTENCE_INDICES


def test_tokens_lowercase_and_treat_br_as_whitespace():
    assert sentiment.tokens("Great<br />BAD, didn't!") == ["great", "bad", "didn't", "!"]


def test_two_documents_logit_sign_follows_label_and_training_is_deterministic():
    texts, labels = ["a wonderful film", "an awful film"], [1, 0]
    model = sentiment.train(texts, labels)
    logits = model.logits(texts + ["wonderful", "awful"])
    assert logits[0] > 0 > logits[1] and logits[2] > 0 > logits[3]
    np.testing.assert_array_equal(sentiment.train(texts, labels).weights, model.weights)


def test_select_scores_every_l2_and_step_count():
    texts = [f"{('great', 'awful')[i % 2]} film number {i}" for i in range(40)]  # held-out numbers are unseen
    chosen, table = sentiment.select(texts, [1 - i % 2 for i in range(40)], l2_grid=(1e-6, 1e-4), max_steps=20,
                                     every=10)
    assert [(row["l2"], row["steps"]) for row in table] == [(1e-6, 10), (1e-6, 20), (1e-4, 10), (1e-4, 20)]
    assert chosen["l2"] in (1e-6, 1e-4) and chosen["steps"] in (10, 20)
    assert max(row["accuracy"] for row in table) == 1.0


def test_bad_labels_are_refused():
    with pytest.raises(DataError, match="both positive and negative"):
        sentiment.train(["good", "fine"], [1, 1])
    with pytest.raises(DataError, match="0 .negative. or 1"):
        sentiment.train(["good", "bad"], [1, 2])


def test_registry_names_the_known_rewards_and_missing_model_dirs(tmp_path):
    with pytest.raises(ConfigError, match="unknown reward 'toxicity'; known rewards: sentiment"):
        rewards.get_reward("toxicity", str(tmp_path))
    with pytest.raises(MissingFileError):
        rewards.get_reward("sentiment", str(tmp_path / "absent"))
    with pytest.raises(MissingFileError, match="no settings.json"):
        rewards.get_reward("sentiment", str(tmp_path))


def write_csv(path, rows, columns=("id", "rating", "label", "text")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    return str(path)


def test_tool_trains_and_scores_labelled_and_unlabelled_csvs(tmp_path):
    tool = _load_tool()
    reviews = [(f"r{i}", 9 if i % 2 else 2, i % 2, f"{'Loved it, truly' if i % 2 else 'Hated it, sadly'} \"{i}\"\nend")
               for i in range(30)]
    data = write_csv(tmp_path / "train.csv", reviews)
    assert tool.main(["train", f"--data={data}", f"--out={tmp_path / 'm'}", "--l2_grid=1e-6", "--max_steps=20",
                      "--every=10", f"--json={tmp_path / 'train.json'}"]) == 0
    assert json.loads((tmp_path / "train.json").read_text())["chosen"]["l2"] == 1e-6
    assert tool.main(["score", f"--model={tmp_path / 'm'}", f"--data={data}", f"--json={tmp_path / 's.json'}"]) == 0
    assert json.loads((tmp_path / "s.json").read_text()) == {"n": 30, "accuracy": 1.0}
    unlabelled = write_csv(tmp_path / "gen.csv", [("a", "Loved it"), ("b", "Hated it")], columns=("id", "text"))
    assert tool.main(["score", f"--model={tmp_path / 'm'}", f"--data={unlabelled}", f"--json={tmp_path / 'u.json'}",
                      f"--scores={tmp_path / 'scores.csv'}"]) == 0
    with open(tmp_path / "scores.csv", newline="") as f:
        scores = list(csv.DictReader(f))
    assert [row["id"] for row in scores] == ["a", "b"] and float(scores[0]["reward"]) > 0 > float(scores[1]["reward"])
    mean = json.loads((tmp_path / "u.json").read_text())["mean_reward"]
    assert mean == pytest.approx(np.mean([float(row["reward"]) for row in scores]), abs=1e-5)


@pytest.mark.parametrize("case", ["missing file", "missing column"])
def test_tool_reports_bad_input_in_one_line(tmp_path, case):
    data = str(tmp_path / "absent.csv.gz")
    if case == "missing column":
        data = write_csv(tmp_path / "nolabel.csv", [("a", "fine")], columns=("id", "text"))
    proc = subprocess.run([sys.executable, TOOL, "train", f"--data={data}", f"--out={tmp_path / 'm'}"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert ("does not exist" if case == "missing file" else "lacks column(s) label") in proc.stderr
