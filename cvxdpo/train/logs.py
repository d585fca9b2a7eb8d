"""Metrics out: `<workdir>/metrics.jsonl`, TensorBoard event files, and a progress bar (process 0 only)."""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
TIMING_PREFIX = "time/"  # wall-clock values, different on every run


def _plain(value):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


class MetricsWriter:
    """Appends one JSON line per logged step. On resume from step s, only lines of steps <= s are kept
    (all were written before checkpoint s); a run starting from scratch starts an empty file. So the
    file of a resumed run equals that of an uninterrupted one."""

    def __init__(self, workdir: str, resume_step: int, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if not self.enabled:
            return
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and 0 < resume_step >= json.loads(line)["step"]]
            with open(self.path, "w") as f:
                f.writelines(kept)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict, prefix: str = "") -> dict:
        row = {f"{prefix}{k}": _plain(v) for k, v in metrics.items()}
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **row}) + "\n")
            for k, v in row.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
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
