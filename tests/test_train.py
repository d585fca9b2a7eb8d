"""The trainer end to end on a tiny model: learning, exact resume, the precomputed reference, mesh invariance,
bad configs and divergence. Kills, SIGTERM, damaged checkpoints and full disks are in test_faults.py."""

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from cvxdpo.data import pipeline, tutor
from cvxdpo.data.tokenizer import load_tokenizer
from cvxdpo.errors import ConfigError, MissingFileError, TrainingDiverged
from cvxdpo.model import gpt2, hub
from cvxdpo.train import reference
from cvxdpo.train.logs import TIMING_PREFIX, read_metrics
from cvxdpo.train.trainer import Trainer
from tiny_config import get_config, logged_losses, losses_on_one_device_and_2x2x2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(pairs, loss=None, **train):
    c = get_config(pairs)
    c.train.update(train)
    c.loss.update(loss or {})
    return c


def _params(trainer):
    return [np.asarray(x) for x in jax.tree.leaves(trainer.state.params)]


def _untimed(rows):
    return [{k: v for k, v in row.items() if not k.startswith(TIMING_PREFIX)} for row in rows]


def test_dpo_learns_the_preference(tmp_path, pairs):
    c = _config(pairs, steps=40)
    report = Trainer(c, str(tmp_path / "dpo")).run()
    before, after = report["eval_before"], report["eval_after"]
    assert 0.25 <= before["eval/preference_accuracy"] <= 0.75  # a random model: near chance
    assert before["eval/loss"] == pytest.approx(np.log(2), abs=1e-6)  # reference = policy at step 0
    assert after["eval/rewards/accuracies"] > 0.9
    assert after["eval/preference_accuracy"] > 0.9
    assert os.path.exists(tmp_path / "dpo" / "hf" / "model.safetensors")


def test_sft_lowers_held_out_nll(tmp_path, pairs):
    report = Trainer(_config(pairs, method="sft", steps=30), str(tmp_path / "sft")).run()
    assert report["eval_after"]["eval/nll"] < 0.7 * report["eval_before"]["eval/nll"]


def test_resume_is_exact(tmp_path, pairs):
    straight = Trainer(_config(pairs), str(tmp_path / "straight"))
    straight.run()
    Trainer(_config(pairs, steps=6), str(tmp_path / "stopped")).run()  # stops after 6 (checkpoint at 4 and 6)
    resumed = Trainer(_config(pairs), str(tmp_path / "stopped"))
    assert resumed.start_step == 6
    resumed.run()
    for a, b in zip(_params(straight), _params(resumed)):
        np.testing.assert_array_equal(a, b)
    # Training rows match exactly (the stopped run also logged its own final evaluation at step 6).
    def train_rows(workdir):
        return [row for row in _untimed(read_metrics(workdir)) if "loss" in row]

    assert train_rows(str(tmp_path / "straight")) == train_rows(str(tmp_path / "stopped"))


def _launch(pairs, workdir, *overrides, entry=("-m", "launch.train")):
    """launch.train (or another `entry` taking its flags) on the tiny config, with dotted config overrides."""
    cmd = [sys.executable, *entry, f"--config=tests/tiny_config.py:{pairs}", f"--workdir={workdir}",
           *[f"--config.{item}" for item in overrides]]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_precomputed_reference_holds_one_copy_and_matches_frozen(tmp_path, pairs):
    frozen = Trainer(_config(pairs, reference="frozen"), str(tmp_path / "frozen"))
    precomputed = Trainer(_config(pairs, reference="precomputed"), str(tmp_path / "precomputed"))
    assert frozen.state.ref_params is not None
    assert precomputed.state.ref_params is None
    assert len(jax.tree.leaves(precomputed.state.params)) == len(jax.tree.leaves(frozen.state.ref_params))
    n_params = len(jax.tree.leaves(precomputed.state.params))
    n_moments = len(jax.tree.leaves(precomputed.state.opt_state))
    assert len(jax.tree.leaves(precomputed.state)) == n_params + n_moments + 2  # + step and rng: no second copy
    frozen.run()
    precomputed.run()
    np.testing.assert_allclose(logged_losses(tmp_path / "precomputed"), logged_losses(tmp_path / "frozen"), rtol=1e-4)
    again = Trainer(_config(pairs, reference="precomputed"), str(tmp_path / "precomputed2"))  # cache reuse
    np.testing.assert_array_equal(again.ref_tables[0], precomputed.ref_tables[0])


def test_reference_cache_key_sees_every_row_and_every_parameter(mesh1):
    """One changed middle row, or one parameter element moved by one ulp, names a new table (a key of the
    first and last rows and of per-leaf sums reused the stale one)."""
    tok, tok_cfg = load_tokenizer("gpt2"), pipeline.TokenizeConfig(max_length=64, max_prompt_length=32)
    rows = tutor.load_tutor_pairs().pairs[:9]
    graphdef, params = nnx.split(gpt2.create(gpt2.preset("tiny"), mesh=mesh1), nnx.Param)

    def key(source=rows, p=params):
        return reference.cache_key(source, tok, tok_cfg, graphdef, p)

    first = key()
    assert key() == first  # the same inputs find their table again
    middle = dataclasses.replace(rows[4], chosen=rows[4].chosen + " Indeed.")
    assert key(rows[:4] + [middle] + rows[5:]) != first
    leaves, treedef = jax.tree.flatten(params)
    nudged = np.array(leaves[0])
    nudged.flat[0] = np.nextafter(nudged.flat[0], np.inf, dtype=nudged.dtype)
    assert key(p=jax.tree.unflatten(treedef, [nudged, *leaves[1:]])) != first


def test_same_losses_on_one_device_and_a_2x2x2_mesh(tmp_path, pairs):
    one, eight = losses_on_one_device_and_2x2x2(_config(pairs, steps=4), tmp_path)
    np.testing.assert_allclose(eight, one, rtol=1e-5)


def test_gradient_accumulation_equals_one_pass(tmp_path, pairs):
    two = jax.devices()[:2]  # 8 pairs in 4 micro-batches of 2: one pair per device per pass
    whole = Trainer(_config(pairs, steps=3), str(tmp_path / "whole"), devices=two)
    split = Trainer(_config(pairs, steps=3, micro_batches=4), str(tmp_path / "split"), devices=two)
    whole.run()
    split.run()
    np.testing.assert_allclose(logged_losses(tmp_path / "split"), logged_losses(tmp_path / "whole"), rtol=1e-5)
    for a, b in zip(_params(whole), _params(split)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # Adam: updates ~3e-3, float noise ~1e-6


# --- bad config values -------------------------------------------------------------------------

@pytest.mark.parametrize("section, field, value, message", [
    ("loss", "name", "kto", "loss.name='kto' is not one of sigmoid"),
    ("loss", "beta", -0.1, "loss.beta must be positive, got -0.1"),
    ("train", "micro_batches", 3, "train.batch_size=8 is not divisible by train.micro_batches=3"),
])
def test_bad_config_values(tmp_path, pairs, section, field, value, message):
    c = _config(pairs)
    c[section][field] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        Trainer(c, str(tmp_path / "run"))


def test_workdir_that_is_a_file(tmp_path, pairs):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        Trainer(_config(pairs), str(tmp_path / "file"))


def test_init_from_without_a_finished_run(tmp_path, pairs):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(MissingFileError, match="holds no finished run's model"):
        Trainer(_config(pairs, init_from=str(tmp_path / "empty")), str(tmp_path / "run"))


def test_launcher_prints_one_line_errors(tmp_path, pairs):
    proc = _launch(pairs, str(tmp_path / "run"), "loss.beta=-1")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1] == "error: loss.beta must be positive, got -1.0"
    assert "Traceback" not in err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, pairs):
    c = _config(pairs, learning_rate=1e30, warmup_steps=1, checkpoint_every=1)  # blows up within a few steps
    with pytest.raises(TrainingDiverged, match=r"became NaN, infinite or out of range by step (\d+).*last good "
                                             r"checkpoint is step"):
        Trainer(c, str(tmp_path / "run")).run()
    resumed = Trainer(c, str(tmp_path / "run"))  # restores the last good checkpoint
    assert 0 < resumed.start_step < c.train.steps
    assert np.isfinite(resumed.evaluate()["loss"])  # its parameters still give a finite loss


def test_huge_learning_rate_stops_before_exporting(tmp_path, pairs):
    """At a learning rate of 1e6 the log-probs run to about -1e16 while the DPO loss sits at a finite 0.0: the
    finite range (train.max_abs_logp) stops the run, and the diverged weights are never exported."""
    c = _config(pairs, learning_rate=1e6, warmup_steps=1)
    with pytest.raises(TrainingDiverged, match=r"out of range by step \d+ .*no checkpoint had been written yet"):
        Trainer(c, str(tmp_path / "run")).run()
    assert not os.path.exists(tmp_path / "run" / "hf")


def test_init_from_with_non_finite_weights(tmp_path, pairs, mesh1):
    model = gpt2.create(gpt2.preset("tiny", vocab_size=320), seed=0, mesh=mesh1)
    model.ln_f_scale[...] = model.ln_f_scale[...].at[3].set(np.nan)
    hub.save_pretrained(model, str(tmp_path / "sft" / "hf"))
    with pytest.raises(ConfigError, match=f"{tmp_path / 'sft' / 'hf'} holds non-finite weights: parameter ln_f_scale "
                                          "has NaN or infinite values"):
        Trainer(_config(pairs, init_from=str(tmp_path / "sft")), str(tmp_path / "run"))
