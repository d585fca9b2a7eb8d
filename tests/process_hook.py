"""`launch.train` as one process of a multi-process run, recording which training examples it reads and
where it saves tokenizers.

    python tests/process_hook.py RECORD_DIR [FAULT STEP] <launch.train flags>

Each training batch this process draws appends one line to RECORD_DIR/process_<index>.jsonl: the batch's
`index` column (the examples' positions in the training source), so a test can check that the processes
read disjoint shards whose union is the one-process run's batch. Each tokenizer it saves appends the
directory to RECORD_DIR/tokenizer_saves_<index>.jsonl, so a test can check that one process writes the files
that all of them share. FAULT and STEP inject a fault as tests/fault_hook.py does (e.g. `kill-after-save 8`).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fault_hook  # noqa: E402  (puts the repository on sys.path)
import grain  # noqa: E402
import jax  # noqa: E402

from cvxdpo.data import pipeline  # noqa: E402
from cvxdpo.data.tokenizer import Tokenizer  # noqa: E402
from launch import common, train  # noqa: E402

_make_dataset = pipeline.make_dataset
_save_tokenizer = Tokenizer.save


def _append(record_dir: str, name: str, value) -> None:
    with open(os.path.join(record_dir, f"{name}_{jax.process_index()}.jsonl"), "a") as f:
        f.write(json.dumps(value) + "\n")


class _Record(grain.transforms.Map):
    """Appends a batch's example indices to this process's record file, as the batch is drawn."""

    def __init__(self, record_dir: str):
        self.record_dir = record_dir

    def map(self, batch: dict) -> dict:
        _append(self.record_dir, "process", batch["index"].tolist())
        return batch


def recording(record_dir: str):
    """pipeline.make_dataset whose endless training stream (num_epochs=None) records each batch drawn;
    the finite evaluation passes are left alone."""

    def make_dataset(*args, num_epochs=None, **kwargs):
        dataset = _make_dataset(*args, num_epochs=num_epochs, **kwargs)
        return dataset.map(_Record(record_dir)) if num_epochs is None else dataset

    return make_dataset


def recording_saves(record_dir: str):
    """Tokenizer.save that records the directory it saves to."""

    def save(self, directory: str) -> str:
        _append(record_dir, "tokenizer_saves", os.path.abspath(directory))
        return _save_tokenizer(self, directory)

    return save


if __name__ == "__main__":
    record_dir = sys.argv.pop(1)
    os.makedirs(record_dir, exist_ok=True)
    pipeline.make_dataset = recording(record_dir)
    Tokenizer.save = recording_saves(record_dir)
    if sys.argv[1] in fault_hook.FAULTS:
        fault_hook.install(sys.argv.pop(1), int(sys.argv.pop(1)))
    common.run(train.main)
