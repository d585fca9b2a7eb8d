"""Held-out evaluation during training: one pass over the whole held-out source, sums reduced at the end.

The objective's `eval_metrics` gives per-batch sums (padding rows weigh 0), so
the result does not depend on the batch size, the mesh or the process count.
SFT reports the response NLL per token; the preference methods the training
metrics' names averaged over pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cvxdpo.data import pipeline
from cvxdpo.train import step as step_lib


class Evaluator:
    def __init__(self, objective, graphdef, mesh, shardings, source, tokenizer, tok_cfg: pipeline.TokenizeConfig,
                 batch_size: int, mode: str, ref_logps=None, max_batches: int = 0):
        """`max_batches` > 0 caps the pass (0 = the whole source); `ref_logps` are precomputed reference rows."""
        self.step = step_lib.make_eval_step(objective, graphdef, mesh, shardings)
        self.mesh, self.source, self.tokenizer, self.tok_cfg = mesh, source, tokenizer, tok_cfg
        self.batch_size, self.mode, self.ref_logps, self.max_batches = batch_size, mode, ref_logps, max_batches

    def __call__(self, state) -> dict:
        dataset = pipeline.make_dataset(self.source, self.tokenizer, self.tok_cfg, self.batch_size, mode=self.mode,
                                        shuffle=False, num_epochs=1, ref_logps=self.ref_logps)
        n = pipeline.batches_per_pass(len(self.source), self.batch_size, jax.process_count())
        if self.max_batches:
            n = min(n, self.max_batches)
        totals = None
        for batch in pipeline.padded_pass(dataset, n):
            sums = self.step(state, step_lib.place_batch(batch, self.mesh))
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        totals = {k: float(v) for k, v in jax.device_get(totals).items()}
        if self.mode == "sft":
            return {"nll": totals["nll_sum"] / max(totals["tokens"], 1), "tokens": totals["tokens"]}
        pairs = max(totals.pop("pairs"), 1.0)
        out = {k: v / pairs for k, v in totals.items() if k != "loss_sum"}
        return {"loss": totals["loss_sum"] / pairs, **out, "pairs": pairs}
