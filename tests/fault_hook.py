"""`launch.train` with one fault injected at the checkpoint of one step, for tests/test_faults.py and tools/faults.py.

    python tests/fault_hook.py FAULT STEP <launch.train flags>

FAULT is one of
  kill-after-save  SIGKILL right after the save of STEP starts: a checkpoint caught mid-write.
  enospc-at-save   the save of STEP fails with "No space left on device", as Orbax's write would on a full disk.
  truncate-data-after-save
                   right after the save of STEP starts, the data file (PATH of --config=tests/tiny_config.py:PATH)
                   is cut to a third of its size, as a file rewritten under a running job.
"""

import errno
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import orbax.checkpoint as ocp  # noqa: E402

from cvxdpo.train.checkpoint import Checkpointer  # noqa: E402
from launch import common, train  # noqa: E402

STEP = None  # set by `install`
_checkpointer_save, _manager_save = Checkpointer.save, ocp.CheckpointManager.save


def _save_then_die(self, step, state, data_iter):
    _checkpointer_save(self, step, state, data_iter)
    if step == STEP:
        os.kill(os.getpid(), signal.SIGKILL)


def _save_then_truncate_data(self, step, state, data_iter):
    _checkpointer_save(self, step, state, data_iter)
    if step == STEP:
        path = next(arg.split(":", 1)[1] for arg in sys.argv if arg.startswith("--config="))
        os.truncate(path, os.path.getsize(path) // 3)


def _disk_full_at_step(self, step, *args, **kwargs):
    if step == STEP:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _manager_save(self, step, *args, **kwargs)


FAULTS = {"kill-after-save": (Checkpointer, "save", _save_then_die),
          "enospc-at-save": (ocp.CheckpointManager, "save", _disk_full_at_step),
          "truncate-data-after-save": (Checkpointer, "save", _save_then_truncate_data)}


def install(fault: str, step: int) -> None:
    """Injects `fault` at the checkpoint of `step` into this process (tests/process_hook.py uses it too)."""
    global STEP
    STEP = step
    owner, name, replacement = FAULTS[fault]
    setattr(owner, name, replacement)


if __name__ == "__main__":
    install(sys.argv.pop(1), int(sys.argv.pop(1)))
    common.run(train.main)
