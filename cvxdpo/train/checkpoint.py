"""Orbax checkpoints of the whole train state plus the Grain iterator, keep-last-N, async.

Orbax writes each step into a temporary directory and renames it only when
the write is complete (`commit_success`), so a process killed mid-write leaves
nothing that `latest_step` would pick. Files can still be damaged afterwards
(a disk error, a copy cut short, a hand edit): `restore` then falls back to the
newest step that reads back whole. It tells that apart from a checkpoint
written under another config (other array paths or shapes), which it refuses
before reading any array. A checkpoint written by one number of processes resumes under another
(`DataHandler`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging as std_logging
import os
import re
import sys
import traceback
import warnings

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from cvxdpo.errors import CheckpointError, OutputError


def abstract_like(state):
    """Restore targets (shape, dtype, sharding) of a live state, so a checkpoint lands sharded on any mesh."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _shapes(tree) -> dict[str, tuple]:
    """{"params/wte/value": shape, ...} of a state or of a checkpoint's array metadata."""
    return {k: tuple(v.shape) for k, v in ocp.tree.to_flat_dict(tree, sep="/").items()}


def config_mismatch(saved: dict[str, tuple], wanted: dict[str, tuple]) -> str | None:
    """The first array that a checkpoint and the run's state disagree on (missing, extra, or another shape),
    or None when every path and shape agree."""
    for key in sorted(saved.keys() | wanted.keys(), key=lambda k: (not k.startswith("params/"), k)):
        if key not in saved:
            return f"this run has {key}, the checkpoint does not"
        if key not in wanted:
            return f"the checkpoint has {key}, this run does not"
        if saved[key] != wanted[key]:
            return f"{key} has shape {saved[key]} in the checkpoint, {wanted[key]} in this run"
    return None


def _brief(error: BaseException) -> str:
    """An exception as a short phrase: Orbax and TensorStore messages run to hundreds of characters."""
    text = (str(error).splitlines() or [""])[0]
    return f"{type(error).__name__}: {text[:100]}{'...' * (len(text) > 100)}"


def write_failure(error: BaseException) -> str | None:
    """Why a checkpoint write failed (e.g. "No space left on device"), or None when `error` is no failed
    write. Orbax's own files raise OSError; TensorStore's array writes raise a ValueError whose text ends
    "...: No space left on device [os_error_code='28']"."""
    if isinstance(error, OSError):
        return error.strerror or _brief(error)
    found = re.search(r"([^:]+) \[os_error_code='?\d+'?\]", str(error)) if isinstance(error, ValueError) else None
    return found.group(1).strip() if found else None


class _DropOrbaxTracebacks(std_logging.Filter):
    """Orbax logs each failure of a background write with its traceback (a hundred lines) before raising it
    in the main thread, where `Checkpointer` turns it into one line (or, when it is no failed write, lets it
    go with its own traceback): the logged copies are dropped."""

    def filter(self, record):
        return not (record.exc_info and "orbax" in record.pathname)


def _raised_in_orbax(error: BaseException | None) -> bool:
    return error is not None and any("orbax" in f.filename for f in traceback.extract_tb(error.__traceback__))


class _DropUnretrieved(std_logging.Filter):
    def filter(self, record):
        return not record.getMessage().partition("\n")[0].endswith("exception was never retrieved")


@functools.cache
def _drop_orbax_tracebacks() -> None:
    std_logging.getLogger("absl").addFilter(_DropOrbaxTracebacks())


@functools.cache
def _silence_abandoned_reads() -> None:
    """Drops, from now on, the echoes of a failed restore. Orbax reads a checkpoint's arrays concurrently in
    an event loop of its own; when one read fails it closes that loop with the others still in flight, and
    each of them later reports its own error (a page of TensorStore spec, "Event loop is closed", "exception
    was never retrieved", "coroutine was never awaited") whenever it finishes or is finalized, up to
    interpreter exit. `restore` has said what failed in one line; only these reports are dropped: errors
    raised in Orbax that nobody will handle, the closed loop's, asyncio's report of futures whose error
    nobody read, and Orbax's unfinished coroutines."""
    previous = sys.unraisablehook

    def hook(unraisable):
        error = unraisable.exc_value
        closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        if not (_raised_in_orbax(error) or (unraisable.object is None and closed_loop)):
            previous(unraisable)

    sys.unraisablehook = hook
    std_logging.getLogger("asyncio").addFilter(_DropUnretrieved())
    warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning, module=r"orbax\.")


class DataHandler(grain.checkpoint.CheckpointHandler):
    """Grain's handler of the iterator state, which also restores a checkpoint that another number of
    processes wrote.

    Each process writes its own state, process_<i>-of-<n>.json. This project's pipeline state is one counter,
    `next_index`, the batches read; process p's batch b holds the examples p, p + n, ... of global batch b of
    one shuffled stream (see cvxdpo.data.pipeline), so the counter means the same under any process count
    and moves over unchanged. A state holding more than the counter (data.workers > 0 adds the worker
    processes' positions) is refused rather than guessed.
    """

    def restore(self, directory, item=None, args=None):
        own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if own.exists():
            return super().restore(directory, item, args)
        item = item or args.item
        item.set_state(portable_state(directory))
        item.start_prefetch()  # as Grain's own restore does
        return item


def portable_state(directory) -> dict:
    """The iterator state that the processes of another process count wrote, as one process's state."""
    states = [json.loads(path.read_text()) for path in sorted(directory.glob("process_*-of-*.json"))]
    if not states:
        raise CheckpointError(f"{directory} holds no data iterator state")
    if any(set(state) != {"next_index"} or state != states[0] for state in states):
        raise CheckpointError(f"the data position in {directory} was written by {len(states)} processes with "
                              f"worker processes (data.workers > 0) and cannot move to {jax.process_count()}; "
                              f"resume with {len(states)} processes, or with data.workers=0 from the start")
    return states[0]


@ocp.args.register_with_handler(DataHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    item: grain.DatasetIterator


@ocp.args.register_with_handler(DataHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    item: grain.DatasetIterator


class Checkpointer:
    def __init__(self, directory: str, keep: int, async_save: bool = True):
        """CheckpointError when `directory` is a file: Orbax would find no checkpoint in it and the run would
        start over from step 0 (replacing the metrics of the run whose checkpoints it held), only to fail at
        its first save."""
        _drop_orbax_tracebacks()
        self.directory = os.path.abspath(directory)
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(f"{self.directory} is a file, not a directory of checkpoints; move it away")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 cleanup_tmp_directories=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": DataHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iter) -> None:
        """Starts writing checkpoint `step` in the background; a failed write, this one's or an earlier
        background one's, raises OutputError."""
        with self._writing():
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            data=DataSave(data_iter)))

    def restore(self, template_state, data_iter):
        """(step, state) of the newest checkpoint that reads back whole, or (None, template_state) without any.

        A step whose arrays have other paths or shapes than `template_state`
        was written under another config: CheckpointError, before anything is
        read. A step that fails to read (a truncated or overwritten file,
        deleted arrays, missing metadata) is skipped with a one-line warning
        for the one before it; when no step reads back, CheckpointError names
        the steps tried.
        """
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return step, self._restore_step(step, template_state, data_iter)
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 (TensorStore raises plain Exception for a damaged array file)
                _silence_abandoned_reads()
                logging.warning("checkpoint %d in %s is damaged or incomplete (%s); trying the one before", step,
                                self.directory, _brief(e))
                damaged.append(step)
        if damaged:
            raise CheckpointError(f"no checkpoint in {self.directory} can be restored: steps "
                                  f"{', '.join(map(str, damaged))} are damaged or incomplete; move the directory "
                                  "away to start from step 0")
        return None, template_state

    def _restore_step(self, step: int, template_state, data_iter):
        """The state of checkpoint `step`; CheckpointError when its array shapes are not the template's."""
        target = abstract_like(template_state)
        problem = config_mismatch(_shapes(self.manager.item_metadata(step)["state"]), _shapes(target))
        if problem:
            raise CheckpointError(f"checkpoint {step} in {self.directory} cannot be restored into this run's "
                                  f"state (was the config changed?): {problem}")
        return self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=DataRestore(data_iter)))["state"]

    def close(self):
        """Waits for the last background write; a failed one raises OutputError."""
        try:
            with self._writing():
                self.manager.close()
        except OutputError:
            self.manager.close()  # Orbax raises a background error once: this close releases the rest
            raise

    @contextlib.contextmanager
    def _writing(self):
        """A failed write (a full disk, a lost mount) as one line that says what is still there."""
        try:
            yield
        except (OSError, ValueError) as e:
            reason = write_failure(e)
            if reason is None:
                raise
            with contextlib.suppress(OSError, ValueError):
                self.manager.wait_until_finished()  # an earlier write still in flight may yet complete
            self.manager.reload()  # what is on disk now
            steps = self.manager.all_steps()
            newest = f"step {max(steps)}" if steps else "none"
            raise OutputError(f"cannot write a checkpoint to {self.directory}: {reason}; "
                              f"the newest complete checkpoint is {newest}") from None
