"""`launch.train` that SIGKILLs itself right after the save of one step starts: a checkpoint caught mid-write.

    python tests/kill_after_save.py STEP <launch.train flags>
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cvxdpo.train.checkpoint import Checkpointer  # noqa: E402
from launch import common, train  # noqa: E402

KILL_AT = int(sys.argv.pop(1))
_save = Checkpointer.save


def _save_then_die(self, step, state, data_iter):
    _save(self, step, state, data_iter)
    if step == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    Checkpointer.save = _save_then_die
    common.run(train.main)
