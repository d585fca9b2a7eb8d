"""Fault injection at the tiny size: whatever stops a run, rerunning the same command finishes it with the
uninterrupted run's weights (bit for bit) and metrics (all but the wall-clock `time/` fields), and a
failure is one line on stderr.

Runs go through `launch.train` in their own processes (tools/faults.py's TinyRun), sharing one JAX
compilation cache, so that each run after the first takes seconds; the uninterrupted run is made once. The
random kill and stop points come from FAULTS_SEED (default 0).
"""

import errno
import json
import logging
import os
import random
import re
import shutil
import signal

import jax
import pytest

from cvxdpo.errors import CheckpointError, OutputError
from cvxdpo.train.checkpoint import config_mismatch, write_failure
from cvxdpo.train.logs import METRICS_FILE, MetricsWriter
from cvxdpo.train.trainer import Trainer
from multiprocess import faults
from tiny_config import get_config

SEED = int(os.environ.get("FAULTS_SEED", "0"))




@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def straight(pairs, cache, tmp_path_factory):
    """The uninterrupted run every other run is compared with."""
    run = faults.TinyRun(str(tmp_path_factory.mktemp("straight") / "run"), pairs, cache)
    run.finish()
    return run


def _copy(run, tmp_path):
    shutil.copytree(run.workdir, tmp_path / "copy")
    return faults.TinyRun(str(tmp_path / "copy"), run.pairs, run.cache_dir)


def _one_line_error(proc) -> str:
    """The whole stderr of a run that failed as a user error should: one line, exit status 2."""
    _, err = proc.communicate(timeout=600)
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


def _assert_same_as(run, straight):
    assert faults.same_weights(run.weights(), straight.weights())
    assert run.rows() == straight.rows()


# --- kills and stops -------------------------------------------------------------------------------------

def test_sigkill_mid_checkpoint_write_and_between_steps(straight, pairs, cache, tmp_path):
    """Killed while writing checkpoint 8, its metrics then left with a half-written last row (what a kill
    mid-write leaves), killed again at a random step, then rerun: the uninterrupted run, exactly."""
    run = faults.TinyRun(str(tmp_path / "run"), pairs, cache)
    run.kill_during_save(8)
    assert run.checkpoints() in ([4], [4, 8])  # the save of 8 waited for 4's; 8 was caught mid-write or not
    with open(os.path.join(run.workdir, METRICS_FILE), "a") as f:
        f.write('{"step": 9, "loss": 0.12')
    run.kill_at_step(random.Random(SEED).randint(max(run.checkpoints()) + 1, run.steps - 1))
    run.finish()
    _assert_same_as(run, straight)


def test_sigterm_checkpoints_the_step_and_resumes_identically(straight, pairs, cache, tmp_path):
    run = faults.TinyRun(str(tmp_path / "run"), pairs, cache)
    line = _one_line_error(run.signal_at_step(random.Random(SEED + 1).randint(2, run.steps - 2), signal.SIGTERM))
    stopped = int(re.fullmatch(r"error: stopped by SIGTERM at step (\d+); resume by rerunning the same command "
                               r"\(checkpoint \1 is in .*\)", line).group(1))
    assert stopped < run.steps and max(run.checkpoints()) == stopped == run.logged_step()
    run.finish()
    _assert_same_as(run, straight)


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(straight, pairs, cache, tmp_path):
    run = faults.TinyRun(str(tmp_path / "run"), pairs, cache)
    line = _one_line_error(run.start("enospc-at-save:8"))
    assert line == (f"error: cannot write a checkpoint to {run.workdir}/checkpoints: No space left on device; "
                    "the newest complete checkpoint is step 4")
    assert run.checkpoints() == [4]
    run.finish()
    _assert_same_as(run, straight)


def test_data_file_truncated_mid_run(straight, pairs, cache, tmp_path):
    """The data file cut short after step 4 (rows are read by byte offset all run long): one line naming it;
    with the file put back, the rerun resumes and ends as the uninterrupted run."""
    data = str(tmp_path / "pairs.jsonl")
    shutil.copy(pairs, data)
    run = faults.TinyRun(str(tmp_path / "run"), data, cache)
    line = _one_line_error(run.start("truncate-data-after-save:4"))
    assert line.startswith(f"error: data file {data} changed during the run (size {os.path.getsize(pairs)} -> ")
    shutil.copy(pairs, data)
    run.finish()
    assert faults.same_weights(run.weights(), straight.weights())


def test_write_failures_read_from_tensorstore_and_os_errors():
    """On a real full disk the array writes fail in TensorStore, as a ValueError (seen on a 3 MB tmpfs)."""
    tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing "step/0" in OCDBT database at local file "/w/": '
                             'Failed to write 898280 bytes to file 5: No space left on device [os_error_code=\'28\']')
    assert write_failure(tensorstore) == "No space left on device"
    assert write_failure(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) == "No space left on device"
    assert write_failure(ValueError("step 8 already exists")) is None  # not a write failure: keeps its traceback


def test_full_disk_under_the_metrics_is_one_line(tmp_path, monkeypatch):
    """tensorboardX's own writer thread died on a full disk and training then blocked forever on its queue."""
    from tensorboardX.record_writer import RecordWriter

    writer = MetricsWriter(str(tmp_path), resume_step=0, enabled=True)

    def disk_full(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(RecordWriter, "flush", disk_full)
    with pytest.raises(OutputError, match=f"^cannot write the metrics of {tmp_path}: No space left on device$"):
        writer.write(1, {"loss": 0.5, "grad_norm": 1.0})


# --- reruns -------------------------------------------------------------------------------------------------

def test_rerun_of_a_finished_run_writes_nothing(straight, tmp_path):
    run = _copy(straight, tmp_path)
    metrics = (tmp_path / "copy" / METRICS_FILE).read_bytes()
    events = sorted(os.listdir(tmp_path / "copy" / "tensorboard"))
    report = json.loads(run.finish().split("\n== outputs")[0])
    assert (tmp_path / "copy" / METRICS_FILE).read_bytes() == metrics
    assert sorted(os.listdir(tmp_path / "copy" / "tensorboard")) == events
    held_out = [{k: v for k, v in row.items() if k != "step"} for row in straight.rows() if "eval/loss" in row]
    assert (report["start_step"], report["steps"]) == (run.steps, run.steps)
    assert [report["eval_before"], report["eval_after"]] == [held_out[0], held_out[-1]]
    assert faults.same_weights(run.weights(), straight.weights())  # exported again, the same


def test_resume_under_another_model_shape_is_refused_and_changes_nothing(straight, tmp_path):
    """One short line (no Orbax text, no asyncio noise at exit), before config.json or metrics are touched."""
    run = _copy(straight, tmp_path)
    files = {name: (tmp_path / "copy" / name).read_bytes() for name in ("config.json", METRICS_FILE)}
    line = _one_line_error(run.start(None, "model.overrides.n_embd=128"))
    assert line == (f"error: checkpoint 12 in {run.workdir}/checkpoints cannot be restored into this run's state "
                    "(was the config changed?): params/blocks/attn_out_bias/value has shape (2, 64) in the "
                    "checkpoint, (2, 128) in this run")
    assert {name: (tmp_path / "copy" / name).read_bytes() for name in files} == files


# --- damaged checkpoints --------------------------------------------------------------------------------

def _trainer(run):
    return Trainer(get_config(run.pairs), run.workdir, devices=jax.devices()[:faults.DEVICES])


@pytest.mark.parametrize("damage", faults.DAMAGES, ids=lambda f: f.__name__)
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(straight, tmp_path, caplog, damage):
    run = _copy(straight, tmp_path)
    damage(os.path.join(run.workdir, "checkpoints", "12"))
    with caplog.at_level(logging.WARNING):
        trainer = _trainer(run)
    trainer.checkpointer.close()
    assert trainer.start_step == 8
    warnings = [r.getMessage() for r in caplog.records if "checkpoint" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0] and len(warnings[0]) < 400
    assert re.fullmatch(r"checkpoint 12 in .* is damaged or incomplete \(.*\); trying the one before", warnings[0])


def test_no_intact_checkpoint_is_one_line_naming_the_steps(straight, tmp_path):
    run = _copy(straight, tmp_path)
    for step in (8, 12):
        faults.delete_arrays(os.path.join(run.workdir, "checkpoints", str(step)))
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be restored: steps 12, 8 are damaged or "
                                              r"incomplete; move the directory away to start from step 0$"):
        _trainer(run)


def test_config_mismatch_names_the_first_parameter():
    saved = {"opt_state/mu/wte/value": (320, 64), "params/wte/value": (320, 64), "step": ()}
    assert config_mismatch(saved, dict(saved)) is None
    assert config_mismatch(saved, {**saved, "opt_state/mu/wte/value": (320, 8), "params/wte/value": (320, 8)}) == (
        "params/wte/value has shape (320, 64) in the checkpoint, (320, 8) in this run")
    assert config_mismatch(saved, {**saved, "extra/w": (3,)}) == "this run has extra/w, the checkpoint does not"


# --- metrics -----------------------------------------------------------------------------------------------

def test_metrics_writer_drops_a_half_written_last_line(tmp_path):
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)]
    (tmp_path / METRICS_FILE).write_text("".join(rows) + '{"step": 4, "lo')
    writer = MetricsWriter(str(tmp_path), resume_step=2, enabled=True)
    writer.write(3, {"loss": 0.5})
    writer.close()
    assert (tmp_path / METRICS_FILE).read_text() == "".join(rows[:2]) + json.dumps({"step": 3, "loss": 0.5}) + "\n"
