"""How well can DPO-Convex's anchor rank pairs it was not fitted on? Its ceiling on a model's own features.

    python tools/anchor_ceiling.py --model=runs/imdb_sentiment/sft/hf --train=runs/imdb_sentiment/train_pairs.jsonl \
        --heldout=runs/imdb_sentiment/valid_pairs.jsonl --json=anchor_ceiling.json

In training the anchor sees the policy's features of the last `anchor.buffer` pairs; when its held-out
accuracy (the logged `convex/heldout_accuracy`) sits at chance, its margin carries no preference and DPO-Convex
can only act as a regularizer. This tool asks whether that is the buffer's size or the features: it computes
the model's features exactly as the train step does (`anchor.pool` of the final hidden states of the
tokenized pairs), fills the buffer with the first N training pairs, refits with `anchor.refit` (the train
step's own code, run to convergence) and reports the fraction of held-out pairs whose margin m > 0, for
each buffer size, feature dimension and penalty, for the convex probe and the linear one. The held-out
pairs are validation pairs, never the test prefixes. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _pairs(path: str, limit: int):
    """The first `limit` pairs of a JSONL file, read by the trainer's own source (bad rows counted, skipped)."""
    from cvxdpo.data.jsonl import jsonl_source

    source = jsonl_source(path)
    return [source[i] for i in range(min(limit, len(source)))]


def hidden_means(model_dir: str, pairs, max_length: int, max_prompt_length: int, batch: int = 64) -> np.ndarray:
    """Mean final hidden state over each response's tokens, (n, 2, E), tokenized as the trainer does."""
    import jax
    import jax.numpy as jnp

    from cvxdpo.data import pipeline
    from cvxdpo.model import hub
    from cvxdpo.train import anchor
    from launch import common

    model, tok = hub.load_pretrained(model_dir), common.model_tokenizer(model_dir)
    cfg = pipeline.TokenizeConfig(max_length=max_length, max_prompt_length=max_prompt_length, truncation="keep_start")
    tokenize, pad = pipeline.Tokenize(tok, cfg, "pairs"), pipeline.PadBatch(cfg, batch, tok.pad_id)
    identity = jnp.eye(model.cfg.n_embd, dtype=jnp.float32)

    @jax.jit
    def pooled(ids, attn, loss):
        B, _, L = ids.shape
        hidden = model(ids.reshape(2 * B, L), attn.reshape(2 * B, L)).hidden
        return anchor.pool(hidden, loss, identity)

    out = []
    for start in range(0, len(pairs), batch):
        chunk = [tokenize.map((i, p)) for i, p in enumerate(pairs[start:start + batch])]
        b = pad(chunk)
        out.append(np.asarray(pooled(b["input_ids"], b["attention_mask"], b["loss_mask"]))[:len(chunk)])
    return np.concatenate(out)


def heldout_accuracy(train_Nx2xE, heldout_Mx2xE, cfg, seed: int = 0) -> tuple[float, float]:
    """(fit accuracy, held-out pair accuracy) of the anchor refitted on a buffer of the given pairs; a penalty
    large enough to zero the classifier gives m = 0 everywhere, which ranks no pair right (0.0)."""
    import jax.numpy as jnp

    from cvxdpo.train import anchor

    state = anchor.init(cfg, train_Nx2xE.shape[-1], seed)
    raw = jnp.asarray(train_Nx2xE) @ state.projection
    state = anchor.refit(state.replace(buffer=raw.reshape(-1, cfg.dim), pairs_seen=jnp.int32(cfg.buffer)), cfg)
    m = anchor.margin(state, jnp.asarray(heldout_Mx2xE) @ state.projection)
    return float(state.fit["accuracy"]), float(jnp.mean(m > 0))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the model whose features the anchor reads (e.g. the SFT run)")
    parser.add_argument("--train", required=True, help="JSONL pairs that fill the buffer, in training order")
    parser.add_argument("--heldout", required=True, help="JSONL pairs the anchor is scored on (validation pairs)")
    parser.add_argument("--buffers", default="256,1024,4096", help="buffer sizes in pairs")
    parser.add_argument("--dims", default="32,128", help="feature dimensions after the random projection")
    parser.add_argument("--regs", default="0.01,0.1", help="the anchor's penalty, anchor.reg")
    parser.add_argument("--max_length", type=int, default=64, help="data.max_length of the runs (IMDb config: 64)")
    parser.add_argument("--max_prompt_length", type=int, default=16, help="data.max_prompt_length (IMDb config: 16)")
    parser.add_argument("--admm_iters", type=int, default=1000, help="ADMM iterations of each (cold) refit")
    parser.add_argument("--json", default="")
    a = parser.parse_args()

    from cvxdpo.train import anchor

    buffers, dims = [int(x) for x in a.buffers.split(",")], [int(x) for x in a.dims.split(",")]
    t = time.perf_counter()
    train = hidden_means(a.model, _pairs(a.train, max(buffers)), a.max_length, a.max_prompt_length)
    heldout = hidden_means(a.model, _pairs(a.heldout, 10**9), a.max_length, a.max_prompt_length)
    print(f"features of {len(train)} + {len(heldout)} pairs in {time.perf_counter() - t:.0f} s", flush=True)
    rows = []
    print("| probe | buffer | dim | reg | fit accuracy | held-out accuracy |\n|---|---|---|---|---|---|")
    for probe in ("convex", "linear"):
        for n in buffers:
            for dim in dims:
                for reg in (float(x) for x in a.regs.split(",")):
                    cfg = dataclasses.replace(anchor.AnchorConfig(), probe=probe, buffer=n, dim=dim, reg=reg,
                                              admm_iters=a.admm_iters)
                    fit, held = heldout_accuracy(train[:n], heldout, cfg)
                    rows.append(dict(probe=probe, buffer=n, dim=dim, reg=reg, fit_accuracy=fit, heldout_accuracy=held))
                    zero = " (zero model)" if fit == 0 else ""
                    print(f"| {probe} | {n} | {dim} | {reg:g} | {fit:.3f}{zero} | {held:.3f} |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "heldout_pairs": len(heldout), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
