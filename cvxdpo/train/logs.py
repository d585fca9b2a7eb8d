"""Metrics out: `<workdir>/metrics.jsonl`, TensorBoard event files, and a progress bar (process 0 only)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time

import jax
import numpy as np
from absl import logging

from cvxdpo.errors import OutputError

METRICS_FILE = "metrics.jsonl"
TIMING_PREFIX = "time/"  # wall-clock values, different on every run


def _plain(value):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


@contextlib.contextmanager
def _writing(workdir: str):
    """A failed write of the metrics (a full disk, a lost mount) as one line."""
    try:
        yield
    except OSError as e:
        raise OutputError(f"cannot write the metrics of {workdir}: {e.strerror or e}") from None


def _kept_lines(path: str, resume_step: int) -> list[str]:
    """The lines of a metrics file that a run resuming from `resume_step` keeps: those of steps up to it,
    all written before its checkpoint. A last line without its newline is a row cut short by a killed
    process (its step was never checkpointed): dropped with a warning."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    if lines and not lines[-1].endswith("\n"):
        logging.warning("dropping the half-written last line of %s: %r", path, lines.pop()[:80])
    return [line for line in lines if 0 < resume_step >= json.loads(line)["step"]]


class _Scalars:
    """TensorBoard scalars written synchronously. tensorboardX's SummaryWriter writes from a thread that dies
    on a full disk, after which its queue fills up and training blocks forever; here a failed write raises."""

    def __init__(self, logdir: str):
        from tensorboardX.event_file_writer import EventsWriter

        os.makedirs(logdir, exist_ok=True)
        self._file = EventsWriter(os.path.join(logdir, "events"))

    def write(self, step: int, row: dict) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        for k, v in row.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self._file.write_event(Event(wall_time=time.time(), step=step, summary=scalar(k, v)))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MetricsWriter:
    """Appends one JSON line per logged step. On resume from step s, only lines of steps <= s are kept
    (all were written before checkpoint s); a run starting from scratch starts an empty file. So the
    file of a resumed run equals that of an uninterrupted one. The file is rewritten whole (a temporary
    file renamed), so a kill at any point leaves either the old or the new file."""

    def __init__(self, workdir: str, resume_step: int, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir, self.path = workdir, os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if not self.enabled:
            return
        with _writing(self.workdir):
            if os.path.exists(self.path):
                kept = _kept_lines(self.path, resume_step)
                with open(self.path + ".tmp", "w") as f:
                    f.writelines(kept)
                os.replace(self.path + ".tmp", self.path)
            self._tb = _Scalars(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict, prefix: str = "") -> dict:
        """Appends `metrics` as the row of `step`; no metrics (an evaluation without held-out data) write
        nothing, not a bare `{"step": ...}` row."""
        row = {f"{prefix}{k}": _plain(v) for k, v in metrics.items()}
        if self.enabled and row:
            with _writing(self.workdir):
                with open(self.path, "a") as f:
                    f.write(json.dumps({"step": step, **row}) + "\n")
                self._tb.write(step, row)
        return row

    def close(self):
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """A tqdm bar that moves every step: step, ETA, loss and tokens/s; silent off process 0 or when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        self.tokens, self.start = 0, time.perf_counter()
        if enabled and jax.process_index() == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, tokens: int, metrics: dict | None) -> None:
        """One step done; `metrics` (a finished step's, or None) give the loss shown."""
        if self.bar is None:
            return
        self.tokens += tokens
        postfix = {"tok/s": f"{self.tokens / max(time.perf_counter() - self.start, 1e-9):.4g}"}
        if metrics is not None:
            postfix["loss"] = f"{float(metrics['loss']):.4g}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()
