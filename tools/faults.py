"""SIGKILL a tiny training run at random points, resume it each time, and compare it with an uninterrupted run.

    python tools/faults.py --kills=3 --out=/tmp/faults [--seed=0]

Trains the tiny config of tests/tiny_config.py once without interruption,
then once more, killed `--kills` times with SIGKILL and rerun after each kill
until it finishes. Each kill lands either at a random logged step or right
after the write of a checkpoint starts (tests/fault_hook.py), so that the
checkpoint is caught mid-write. Prints a table (kill, where, step killed at,
checkpoint resumed from) and whether the final weights and the metrics (all
but the wall-clock `time/` fields) equal the uninterrupted run's, and writes
the same to <out>/faults.json. All runs share one JAX compilation cache
(<out>/jax_cache): after the first, a run takes seconds.

The `TinyRun` helper and the checkpoint damages (`DAMAGES`) are also what
tests/test_faults.py and tools/reliability.py use.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from cvxdpo.train.logs import TIMING_PREFIX, read_metrics  # noqa: E402
from tiny_config import get_config, write_pairs  # noqa: E402

DEVICES = 2  # simulated CPU devices of every run (results depend on the mesh, so all runs share it)


def launch_env(cache_dir: str, devices: int = DEVICES) -> dict:
    """Every compiled program goes to one persistent cache: the runs compile the same programs."""
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": cache_dir, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


class TinyRun:
    """One workdir of `launch.train` on the tiny config, started (and stopped) as a separate process."""

    def __init__(self, workdir: str, pairs: str, cache_dir: str, *overrides: str):
        self.workdir, self.pairs, self.cache_dir, self.overrides = workdir, pairs, cache_dir, overrides
        config = get_config(pairs)
        self.steps, self.checkpoint_every = config.train.steps, config.train.checkpoint_every

    def start(self, fault: str | None = None, *overrides: str) -> subprocess.Popen:
        """launch.train, or with `fault` ("kill-after-save:8", see tests/fault_hook.py) the same with that fault."""
        entry = ["-m", "launch.train"] if fault is None else ["tests/fault_hook.py", *fault.split(":")]
        cmd = [sys.executable, *entry, f"--config=tests/tiny_config.py:{self.pairs}", f"--workdir={self.workdir}",
               *[f"--config.{item}" for item in (*self.overrides, *overrides)]]
        return subprocess.Popen(cmd, cwd=ROOT, env=launch_env(self.cache_dir), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def finish(self, *overrides: str) -> str:
        """Runs (or resumes) to the end; its stdout. RuntimeError with the stderr's tail when it fails."""
        proc = self.start(None, *overrides)
        out, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{self.workdir}: launch.train exited {proc.returncode}:\n{err[-3000:]}")
        return out

    def logged_step(self) -> int:
        """The last training step in metrics.jsonl (0 before any)."""
        path = os.path.join(self.workdir, "metrics.jsonl")
        if not os.path.exists(path):
            return 0
        with open(path) as f:
            steps = [json.loads(line)["step"] for line in f if line.endswith("\n") and '"loss"' in line]
        return max(steps, default=0)

    def signal_at_step(self, step: int, signum: int = signal.SIGKILL) -> subprocess.Popen:
        """Starts the run and sends `signum` once `step` is logged; the process, not yet reaped."""
        proc = self.start()
        deadline = time.time() + 600
        while self.logged_step() < step:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"{self.workdir}: the run ended before logging step {step}: "
                                   f"{proc.communicate()[1][-2000:]}")
            time.sleep(0.02)
        proc.send_signal(signum)
        return proc

    def kill_at_step(self, step: int) -> int:
        """SIGKILLs the run once `step` is logged; the last logged step at the kill."""
        proc = self.signal_at_step(step)
        proc.communicate(timeout=120)
        return self.logged_step()

    def kill_during_save(self, step: int) -> None:
        """Runs until the checkpoint of `step` starts being written, and SIGKILLs it there."""
        proc = self.start(f"kill-after-save:{step}")
        _, err = proc.communicate(timeout=900)
        if proc.returncode != -signal.SIGKILL:
            raise RuntimeError(f"{self.workdir}: expected a SIGKILL at the save of step {step}, got exit "
                               f"{proc.returncode}:\n{err[-2000:]}")

    def checkpoints(self) -> list[int]:
        """The complete checkpoints (a step being written has a temporary name)."""
        directory = os.path.join(self.workdir, "checkpoints")
        return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []

    def weights(self) -> dict:
        import safetensors.numpy

        return safetensors.numpy.load_file(os.path.join(self.workdir, "hf", "model.safetensors"))

    def rows(self) -> list[dict]:
        """metrics.jsonl without the wall-clock fields, which differ on every run."""
        return [{k: v for k, v in row.items() if not k.startswith(TIMING_PREFIX)} for row in read_metrics(self.workdir)]


# Damage done to a written checkpoint step folder (by a disk error, a copy cut short, a hand edit).

def array_files(step_dir: str) -> list[str]:
    folder = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder))]


def truncate(step_dir: str) -> None:
    path = max(array_files(step_dir), key=os.path.getsize)
    os.truncate(path, os.path.getsize(path) // 2)


def overwrite(step_dir: str) -> None:
    with open(max(array_files(step_dir), key=os.path.getsize), "r+b") as f:
        f.write(os.urandom(64))


def delete_arrays(step_dir: str) -> None:
    for path in array_files(step_dir):
        os.remove(path)


def overwrite_metadata(step_dir: str) -> None:
    with open(os.path.join(step_dir, "state", "_METADATA"), "r+b") as f:
        f.write(b"\xff" * 32)


DAMAGES = (truncate, overwrite, delete_arrays, overwrite_metadata)


def same_weights(a: dict, b: dict) -> bool:
    """Bit for bit: the same tensors with the same bytes."""
    import numpy as np

    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def run_plan(run: TinyRun, plan: list[tuple[str, int]], rng: random.Random) -> list[dict]:
    """Kills `run` as `plan` says, resuming after each kill, then finishes it; one row per kill. Each entry
    is (where, step): "save" kills when the checkpoint of `step` starts being written, "step" once `step`
    is logged; a step of 0 is drawn at random past the newest checkpoint when that kill comes."""
    rows = []
    for number, (where, step) in enumerate(plan, start=1):
        newest = max(run.checkpoints(), default=0)
        if newest >= run.steps:
            break  # finished: nothing left to kill
        if where == "save":
            saves = sorted({*range(run.checkpoint_every, run.steps + 1, run.checkpoint_every), run.steps})
            step = step or rng.choice([s for s in saves if s > newest])
            run.kill_during_save(step)
            killed_at = step
        else:
            killed_at = run.kill_at_step(step or rng.randint(newest + 1, run.steps))
        rows.append({"kill": number, "where": "checkpoint write" if where == "save" else "between steps",
                     "step_killed_at": killed_at, "resumed_from": max(run.checkpoints(), default=0)})
    run.finish()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--out", required=True, help="working folder (emptied first) and faults.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    pairs = write_pairs(os.path.join(args.out, "pairs.jsonl"))
    cache = os.path.join(args.out, "jax_cache")
    straight, killed = (TinyRun(os.path.join(args.out, name), pairs, cache) for name in ("straight", "killed"))
    straight.finish()
    rng = random.Random(args.seed)
    plan = [("save" if rng.random() < 0.5 else "step", 0) for _ in range(args.kills)]
    rows = run_plan(killed, plan, rng)
    result = {"kills": rows, "final_weights_identical": same_weights(killed.weights(), straight.weights()),
              "metrics_identical": killed.rows() == straight.rows()}
    print(f"{'kill':>4}  {'where':<16}  {'step killed at':>14}  {'resumed from checkpoint':>23}")
    for r in rows:
        print(f"{r['kill']:>4}  {r['where']:<16}  {r['step_killed_at']:>14}  {r['resumed_from']:>23}")
    print(f"final weights identical to the uninterrupted run: {'yes' if result['final_weights_identical'] else 'NO'}")
    print(f"metrics identical (but time/ fields): {'yes' if result['metrics_identical'] else 'NO'}")
    with open(os.path.join(args.out, "faults.json"), "w") as f:
        json.dump(result, f, indent=2)
    return 0 if result["final_weights_identical"] and result["metrics_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
