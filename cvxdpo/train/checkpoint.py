"""Orbax checkpoints of the whole train state plus the Grain iterator, keep-last-N, async.

Orbax writes each step into a temporary directory and renames it only when
the write is complete (`commit_success`), so a process killed mid-write leaves
nothing that `latest_step` would pick.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp

from cvxdpo.errors import CheckpointError


def abstract_like(state):
    """Restore targets (shape, dtype, sharding) of a live state, so a checkpoint lands sharded on any mesh."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


class Checkpointer:
    def __init__(self, directory: str, keep: int, async_save: bool = True):
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 cleanup_tmp_directories=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iter) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=grain.checkpoint.CheckpointSave(data_iter)))

    def restore(self, step: int, template_state, data_iter):
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_like(template_state)),
                data=grain.checkpoint.CheckpointRestore(data_iter)))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"checkpoint {step} in {self.manager.directory} cannot be restored into this "
                                  f"run's state (was the config changed?): {str(e).splitlines()[0][:300]}") from None
        return restored["state"]

    def close(self):
        self.manager.close()
