"""Precomputed reference log-probs: one pass of the initial policy over the pairs, cached with tensorstore.

After this pass the run holds no reference parameters: each batch carries its
pairs' reference log-probs (`ref_logps`). The table is stored as zarr under the
workdir, keyed by a hash of the data, the tokenization, the tokenizer and the
initial parameters, so a changed input never reuses a stale table.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from absl import logging
from jax.experimental import multihost_utils

from cvxdpo import mesh as mesh_lib
from cvxdpo.data import pipeline
from cvxdpo.train import step as step_lib
from cvxdpo.train.objectives import pair_forward


def fingerprint(params) -> str:
    """A hash of the parameters (per-leaf sums and sums of squares, in float64 on the host)."""
    stats = jax.tree.map(lambda x: jnp.stack([x.astype(jnp.float32).sum(), jnp.square(x.astype(jnp.float32)).sum()]),
                         params)
    values = np.concatenate([np.asarray(multihost_utils.process_allgather(v, tiled=True)).ravel()
                             for v in jax.tree.leaves(stats)])
    return hashlib.sha256(np.round(values.astype(np.float64), 6).tobytes()).hexdigest()[:16]


def cache_key(source, tokenizer, tok_cfg: pipeline.TokenizeConfig, params_hash: str) -> str:
    first, last = source[0], source[len(source) - 1]
    parts = {"n": len(source), "first": [first.prompt, first.chosen, first.rejected],
             "last": [last.prompt, last.chosen, last.rejected], "tokenizer": [tokenizer.name, tokenizer.vocab_size],
             "tokenize": [tok_cfg.max_length, tok_cfg.max_prompt_length, tok_cfg.truncation], "params": params_hash}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _spec(path: str, rows: int) -> dict:
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": path},
            "metadata": {"shape": [rows, 2], "chunks": [min(rows, 65536), 2], "dtype": "<f4"}}


def reference_logps(graphdef, params, source, tokenizer, tok_cfg, batch_size: int, mesh, cache_dir: str) -> np.ndarray:
    """(len(source), 2) reference log-probs of [chosen, rejected], computed once and cached."""
    path = os.path.join(cache_dir, f"{cache_key(source, tokenizer, tok_cfg, fingerprint(params))}.zarr")
    if os.path.exists(os.path.join(path, ".zarray")):
        logging.info("reusing precomputed reference log-probs %s", path)
        return ts.open({**_spec(path, len(source)), "open": True}).result().read().result()

    @jax.jit
    def forward(p, batch):
        logps_Bx2, _, _ = pair_forward(graphdef, p, batch)
        return logps_Bx2

    shards = jax.process_count()
    dataset = pipeline.make_dataset(source, tokenizer, tok_cfg, batch_size, shuffle=False, num_epochs=1)
    table = np.zeros((len(source), 2), np.float32)
    for batch in pipeline.padded_pass(dataset, pipeline.batches_per_pass(len(source), batch_size, shards)):
        with mesh_lib.use_mesh(mesh):
            logps = forward(params, step_lib.place_batch(batch, mesh))
        logps = np.asarray(multihost_utils.process_allgather(logps, tiled=True))
        index = np.asarray(multihost_utils.process_allgather(batch["index"], tiled=True))
        weight = np.asarray(multihost_utils.process_allgather(batch["weight"], tiled=True))
        table[index[weight > 0]] = logps[weight > 0]
    if jax.process_index() == 0:
        ts.open({**_spec(path, len(source)), "create": True, "delete_existing": True}).result().write(table).result()
    multihost_utils.sync_global_devices("reference log-probs written")
    logging.info("precomputed reference log-probs of %d pairs -> %s", len(source), path)
    return table
