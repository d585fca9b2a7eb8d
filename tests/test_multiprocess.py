"""Whole training runs as 2 processes x 4 simulated CPU devices (jax.distributed over gloo) against the same
run as 1 process x 8 devices, for SFT, DPO and DPO-Convex (whose ADMM refit and feature buffer live in the
jitted step, so they run on the global mesh of both processes).

The launches, run once for the module (tests/process_hook.py records the examples each process reads):
  one/<method>   each method straight through in one process: the references (started side by side)
  two/<method>   SFT and DPO straight through in two processes
  two/dpo_convex DPO-Convex in two processes from the one-process checkpoint of step 4, killed while its
                 checkpoint of the last step is written, then rerun: it resumes from its own checkpoint 6
  two_to_one     that two-process checkpoint 6 resumed in one process (beside the rerun)
DPO-Convex's state has every part the others' have (policy, AdamW moments, step, RNG, data position) and the
anchor's buffer and classifier, and restoring goes through the same code for every method, so its runs carry
the kill-and-resume and the restores under the other process count.
"""

import json
import os
import shutil
import signal

import pytest

from cvxdpo.train.logs import TIMING_PREFIX, read_metrics
from multiprocess import start

# method -> (mesh, config overrides)
METHODS = {
    "sft": ("-1,1,1", ["train.method=sft", "train.export_hf=false"]),
    "dpo": ("2,2,2", ["train.export_hf=false"]),
    # A checkpoint and a refit every other step (refits from step 4, when the 32-pair buffer is full), each
    # refit run close to convergence: a refit starts from the previous one's solution, row by row of the
    # buffer, and two processes write a batch's pairs into the buffer in another order (process p's pairs
    # are p, p + 2, ... of the global batch), so after a restore under the other process count a refit cut
    # short (30 iterations) lands elsewhere by 1% of the loss, while a converged one does not depend on
    # where it started.
    "dpo_convex": ("1,4,2", ["train.method=dpo_convex", "anchor.buffer=32", "anchor.refresh_every=2",
                             "anchor.admm_iters=1000", "train.checkpoint_every=2"]),
}
STEPS = 8
COMMON = [f"train.steps={STEPS}", "model.overrides.n_layer=1", "train.keep_checkpoints=3"]
CONVEX = "dpo_convex"
FROM_ONE, FROM_TWO = 4, 6  # the checkpoints restored under the other process count
# Float32 reduction order differs between 8 devices in one process and 4 + 4 over gloo (measured up to 1e-6).
RTOL = 1e-5


def train_rows(workdir) -> dict[int, dict]:
    """step -> the logged training row without the wall-clock fields; each step is logged once."""
    rows = [r for r in read_metrics(str(workdir)) if "loss" in r]
    assert len({r["step"] for r in rows}) == len(rows), "a step was logged twice"
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(TIMING_PREFIX)} for r in rows}


def assert_losses_close(got: dict, want: dict, steps) -> None:
    for step in steps:
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=RTOL), step


def state_bytes(workdir, step: int) -> int:
    folder = os.path.join(workdir, "checkpoints", str(step), "state")
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def drop_checkpoints_after(workdir, step: int) -> None:
    directory = os.path.join(workdir, "checkpoints")
    for name in os.listdir(directory):
        if name.isdigit() and int(name) > step:
            shutil.rmtree(os.path.join(directory, name))


@pytest.fixture(scope="module")
def runs(pairs, tmp_path_factory):
    """Every launch of the module: {name: (workdir, Launch)}, plus the killed run's rows."""
    root = tmp_path_factory.mktemp("runs")

    def begin(name, method, processes, fault=None, workdir=None):
        """Starts launch `name` of `method` in <root>/<workdir or name>, recording in <root>/records/<name>."""
        mesh, overrides = METHODS[method]
        cache = root / "jax_cache" / method  # one per method: runs side by side never write one entry at once
        return start(str(root / (workdir or name)), str(root / "records" / name), pairs, str(cache), processes,
                     mesh, COMMON + overrides, fault)

    def finish(name, running):
        return root / name, running.wait().check()

    out = {}
    references = {method: begin(f"one_{method}", method, 1) for method in METHODS}
    for method, running in references.items():
        out[f"one_{method}"] = finish(f"one_{method}", running)
    for method in ("sft", "dpo"):
        out[f"two_{method}"] = finish(f"two_{method}", begin(f"two_{method}", method, 2))

    shutil.copytree(root / f"one_{CONVEX}", root / f"two_{CONVEX}")
    drop_checkpoints_after(root / f"two_{CONVEX}", FROM_ONE)
    killed = begin("killed", CONVEX, 2, ("kill-after-save", STEPS), workdir=f"two_{CONVEX}")
    out["killed"] = root / f"two_{CONVEX}", killed.wait()
    out["killed_rows"] = train_rows(root / f"two_{CONVEX}")
    shutil.copytree(root / f"two_{CONVEX}", root / "two_to_one")
    rerun, to_one = begin(f"two_{CONVEX}", CONVEX, 2), begin("two_to_one", CONVEX, 1)
    out[f"two_{CONVEX}"] = finish(f"two_{CONVEX}", rerun)
    out["two_to_one"] = finish("two_to_one", to_one)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_give_the_one_process_losses(runs, method):
    """For DPO-Convex the two processes took over at step 5 (FROM_ONE) and refit the anchor at steps 6 and 8."""
    one, two = train_rows(runs[f"one_{method}"][0]), train_rows(runs[f"two_{method}"][0])
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    assert_losses_close(two, one, range(1, STEPS + 1))
    if method == CONVEX:
        assert two[STEPS]["convex/iterations"] > 0 and two[STEPS]["convex/margin"] != 0


@pytest.mark.parametrize("method", METHODS)
def test_each_process_reads_only_its_shard(runs, method):
    """Process p reads every other example of the shuffled stream, starting at p: at each step, the examples
    at positions p, p + 2, ... of the one-process batch, and nothing else."""
    one = runs[f"one_{method}"][1].shards(0)
    assert len(one) == STEPS
    launches = [(runs[f"two_{method}"][1], 0)]
    if method == CONVEX:
        launches = [(runs["killed"][1], FROM_ONE), (runs[f"two_{CONVEX}"][1], FROM_TWO)]
    for launch, first in launches:
        for p in range(2):
            assert launch.shards(p) == [batch[p::2] for batch in one[first:]]


def test_checkpoints_are_written_once(runs):
    """Two processes write one checkpoint (each array once, not once per process), one metrics file and one
    exported model."""
    for method, steps in (("dpo", [4, 8]), (CONVEX, [4, 6, 8])):
        one, two = runs[f"one_{method}"][0], runs[f"two_{method}"][0]
        for workdir in (one, two):
            assert sorted(int(d) for d in os.listdir(workdir / "checkpoints")) == steps
        assert state_bytes(two, STEPS) < 1.25 * state_bytes(one, STEPS)
        with open(two / "checkpoints" / str(STEPS) / "_CHECKPOINT_METADATA") as f:
            assert json.load(f)  # readable whole
    assert (runs[f"two_{CONVEX}"][0] / "hf" / "model.safetensors").exists()


def test_killed_and_resumed_two_processes_repeat_the_same_steps(runs):
    """Both processes died at the save of the last step; rerun, they resume from their checkpoint 6 and log
    steps 7 and 8 again bit for bit, every field."""
    killed, resumed = runs["killed"][1], runs[f"two_{CONVEX}"][1]
    assert killed.returncodes == [-signal.SIGKILL] * 2
    assert resumed.report()["start_step"] == FROM_TWO
    before, after = runs["killed_rows"], train_rows(runs[f"two_{CONVEX}"][0])
    assert sorted(before) == sorted(after) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert after[step] == before[step], step


@pytest.mark.parametrize("direction", ["one_to_two", "two_to_one"])
def test_checkpoint_restores_under_the_other_process_count(runs, direction):
    """The one-process checkpoint 4 resumed by two processes, and their checkpoint 6 by one process, read the
    same examples and give the same losses as the straight run (the Grain state written by process 0 of 2
    positions the one process's stream, and the other way round)."""
    one = runs[f"one_{CONVEX}"]
    if direction == "one_to_two":
        launch, first, rows = runs["killed"][1], FROM_ONE, runs["killed_rows"]
    else:
        (workdir, launch), first = runs["two_to_one"], FROM_TWO
        rows = train_rows(workdir)
        assert launch.report()["start_step"] == first
    assert launch.batches() == [batch[0::2] + batch[1::2] if direction == "one_to_two" else batch
                                for batch in one[1].shards(0)[first:]]
    assert_losses_close(rows, train_rows(one[0]), range(first + 1, STEPS + 1))


def test_only_process_0_writes_the_tokenizer(runs):
    """Process 0 trains the BPE and writes <workdir>/tokenizer; process 1 reads it once written. A resumed
    run trains none: process 0 writes only the exported model's copy."""
    two = runs["two_sft"]
    assert two[1].tokenizer_saves(0) == [str(two[0] / "tokenizer")]
    assert two[1].tokenizer_saves(1) == []
    resumed = runs[f"two_{CONVEX}"][1]
    assert resumed.tokenizer_saves(0) == [str(runs[f"two_{CONVEX}"][0] / "hf")]  # the exported model's
    assert resumed.tokenizer_saves(1) == []


def test_a_data_position_with_worker_states_is_refused_under_another_process_count(tmp_path):
    """Worker processes (data.workers > 0) keep per-process positions that cannot be moved: one line, no guess."""
    from etils import epath

    from cvxdpo.errors import CheckpointError
    from cvxdpo.train.checkpoint import portable_state

    for i in range(2):
        (tmp_path / f"process_{i}-of-2.json").write_text(json.dumps({"next_index": 5}))
    assert portable_state(epath.Path(tmp_path)) == {"next_index": 5}
    (tmp_path / "process_1-of-2.json").write_text(json.dumps({"next_index": 5, "workers_state": {"0": 3}}))
    with pytest.raises(CheckpointError, match="written by 2 processes with worker processes"):
        portable_state(epath.Path(tmp_path))
