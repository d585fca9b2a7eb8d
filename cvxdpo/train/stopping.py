"""A graceful stop on SIGTERM, what schedulers send before they preempt or cancel a job.

Instead of dying mid-step and losing the steps since the last checkpoint, the
trainer finishes its step, writes a checkpoint of it and stops; rerunning the
same command resumes exactly there. A second SIGTERM acts at once (the
handler puts the previous one back when it fires), and a SIGKILL is always
safe: checkpoints are written to a temporary name first.

With several processes, JAX's preemption service (started by
`jax.distributed.initialize`) catches SIGTERM on any host and picks one step
at which every host stops: hosts stopping at the step their own signal
arrived would wait in different collectives.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class StopOnSigterm:
    """Context manager for the training loop: `requested(step)` turns True once SIGTERM has arrived."""

    name = "SIGTERM"

    def __init__(self):
        self._received = False
        self._previous = None

    def __enter__(self):
        # Python handlers can only be set from the main thread; JAX's own service covers several processes.
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._note) or signal.SIG_DFL
        return self

    def _note(self, signum, frame):
        self._received = True
        signal.signal(signal.SIGTERM, self._previous)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def requested(self, step: int) -> bool:
        """Whether to stop after `step` (called once per step, by every process; no device sync)."""
        if jax.process_count() == 1:
            return self._received
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # the preemption service is turned off (jax_enable_preemption_service)
            return False
