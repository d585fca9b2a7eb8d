"""Streaming a hub dataset split to a local JSON-lines file (rows go to disk, never all in memory)."""

from __future__ import annotations

import json
import os

from cvxdpo.errors import ConfigError, MissingFileError


def stream_to_jsonl(name: str, split: str, out_path: str, data_dir: str | None = None) -> str:
    """Writes `name`/`split` to `out_path` once (atomically); later calls reuse the file."""
    if os.path.exists(out_path):
        return out_path
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"reading {name} from the hub needs the `datasets` package: "
                          "pip install 'cvxdpo[hub-data]'") from None
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    try:
        stream = datasets.load_dataset(name, data_dir=data_dir, split=split, streaming=True)
        with open(out_path + ".tmp", "w") as f:
            for row in stream:
                f.write(json.dumps(row) + "\n")
    except Exception as e:  # network, missing split or hub errors
        raise MissingFileError(f"could not stream {name} split {split!r} from the hub "
                               f"({type(e).__name__}: {str(e)[:200]}); pass a local file instead") from None
    os.replace(out_path + ".tmp", out_path)
    return out_path
