"""Memory per device and communication per step of GPT-2 preference training under data, fsdp and tensor meshes,
computed from the model's shape; prints a table and writes docs/scaling.md and its JSON.

    python tools/scaling.py [--pairs=256] [--length=512] [--markdown=docs/scaling.md] [--json=docs/scaling.json]

Parameters and optimizer state follow the parameter table (cvxdpo.model.gpt2.PARAMS) and the logical-axis
rules (cvxdpo.mesh.LOGICAL_RULES) exactly: each dimension is divided by the mesh axes it is split over, and a
mesh the trainer would refuse (a dimension that does not divide, a batch that does not divide) is marked so.
Activations are counted per sequence and layer as A_E L E + A_H H L^2 + A_M L M elements plus A_V L V for the
logits (A_V_CHUNKED C V for the chunked log-probs' chunk of C positions, the default) (see `memory` for remat), with coefficients fitted to XLA's compiled memory analysis of the real train
step (float32, CPU);
tests/test_scaling.py checks the whole estimate against that analysis on simulated meshes of up to 8 devices.
Communication is what ring collectives send per device: gradients all-reduced over `data`, parameters
all-gathered (forward and backward) and gradients reduce-scattered over `fsdp`, and each block's two
activation all-reduces (forward and backward) over `tensor`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import types

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cvxdpo import mesh as mesh_lib  # noqa: E402
from cvxdpo.errors import ConfigError  # noqa: E402
from cvxdpo.model import gpt2  # noqa: E402

MODELS = {"gpt2": gpt2.preset("gpt2"), "gpt2-medium": gpt2.preset("gpt2-medium"),
          "gpt2-1.5b": gpt2.GPT2Config(n_layer=48, n_embd=1600, n_head=25)}  # GPT-2 XL's shape
LAYOUTS = {"data": 0, "fsdp": 1, "tensor": 2}  # which mesh axis holds all devices
DEVICES = tuple(2 ** k for k in range(9))  # 1 .. 256
# Elements kept per sequence by the step, fitted to XLA's memory analysis (see the module docstring).
A_E, A_H, A_M, A_V = 18.0, 2.0, 6.0, 10.0
# The chunked log-probs (model.logprob_chunk > 0) hold a chunk's logits, softmax and weighted softmax instead of
# the whole (L, V) logits and their gradient (cvxdpo.model.logprobs; tests/test_logprobs.py measures it).
A_V_CHUNKED = 3.0
REMAT_A_E = 2.0  # with remat a layer keeps only its inputs (and their copy in the scan's stack)
BYTES = {"float32": 4, "bfloat16": 2}
GIB = 2 ** 30


def mesh_shape(layout: str, devices: int) -> dict[str, int]:
    shape = dict.fromkeys(mesh_lib.MESH_AXES, 1)
    shape[mesh_lib.MESH_AXES[LAYOUTS[layout]]] = devices
    return shape


def refusal(cfg: gpt2.GPT2Config, shape: dict[str, int], pairs: int) -> str | None:
    """Why the trainer would refuse this mesh (the model's own check, and the batch's), or None."""
    try:
        gpt2.check_fits_mesh(cfg, types.SimpleNamespace(axis_names=mesh_lib.MESH_AXES, shape=shape))
    except ConfigError as e:
        return str(e)
    if pairs % (shape["data"] * shape["fsdp"]):
        return f"{pairs} pairs do not divide over data x fsdp = {shape['data'] * shape['fsdp']}"
    return None


def param_elements(cfg: gpt2.GPT2Config, shape: dict[str, int], layers: bool = True) -> float:
    """Parameter elements on one device (only the per-layer ones of one layer when layers=False)."""
    total = 0.0
    for p in gpt2.PARAMS:
        if not layers and not p.per_layer:
            continue
        size = math.prod(p.shape(cfg)) / (cfg.n_layer if not layers else 1)
        for logical in p.logical:
            size /= math.prod(shape[a] for a in mesh_lib.mesh_axes(logical))
        total += size
    return total


def activation_elements(cfg: gpt2.GPT2Config, shape: dict[str, int], sequences: int,
                        length: int) -> tuple[float, float, float]:
    """(one layer's activations, every layer's input, logits) in elements on one device, for `sequences`
    sequences of `length` tokens."""
    local = sequences / (shape["data"] * shape["fsdp"])
    t = shape["tensor"]  # splits heads, MLP width and vocabulary; the E-wide activations stay whole
    one_layer = A_E * length * cfg.n_embd + (A_H * cfg.n_head * length ** 2 + A_M * length * cfg.d_mlp) / t
    inputs = REMAT_A_E * cfg.n_layer * length * cfg.n_embd
    if cfg.logprob_chunk:
        logits = A_V_CHUNKED * min(length, cfg.logprob_chunk) * cfg.padded_vocab_size / t
    else:
        logits = A_V * length * cfg.padded_vocab_size / t
    return local * one_layer, local * inputs, local * logits


def memory(cfg: gpt2.GPT2Config, shape: dict[str, int], sequences: int, length: int, method: str = "dpo",
           dtype: str = "bfloat16") -> dict[str, float]:
    """Bytes per device: float32 parameters, AdamW's two moments, the frozen reference (DPO), the gradient, and
    activations (in `dtype`, logits in float32) without and with remat. Without remat every layer's activations
    are live with the logits' gradient; with remat only the layers' inputs are kept, and the peak is the larger
    of one recomputed layer and the logits, which are not live together."""
    params = 4 * param_elements(cfg, shape)
    out = {"params": params, "optimizer": 2 * params, "reference": params if method == "dpo" else 0.0,
           "gradients": params}
    if shape["fsdp"] > 1:  # one layer's weights gathered whole just in time
        out["gathered_layer"] = 4 * param_elements(cfg, {**shape, "fsdp": 1}, layers=False)
    one_layer, inputs, logits = activation_elements(cfg, shape, sequences, length)
    size = BYTES[dtype]
    out["activations"] = size * cfg.n_layer * one_layer + 4 * logits
    out["activations_remat"] = size * inputs + max(size * one_layer, 4 * logits)
    return out


def communication(cfg: gpt2.GPT2Config, shape: dict[str, int], sequences: int, length: int,
                  dtype: str = "bfloat16") -> float:
    """Bytes one device sends per step in ring collectives."""
    d, f, t = shape["data"], shape["fsdp"], shape["tensor"]
    weights = 4 * param_elements(cfg, {**shape, "data": 1, "fsdp": 1})  # this tensor shard, whole over fsdp
    sent = 2 * (d - 1) / d * weights / f  # gradient all-reduce of this device's fsdp shard
    sent += 3 * (f - 1) / f * weights  # all-gather forward and backward, reduce-scatter of the gradient
    activation = BYTES[dtype] * sequences / (d * f) * length * cfg.n_embd
    sent += (4 * cfg.n_layer + 2) * 2 * (t - 1) / t * activation  # 2 all-reduces per block each way + embedding
    return sent


def refit_share(cfg: gpt2.GPT2Config, sequences: int, length: int, devices: int, buffer: int = 256, dim: int = 32,
                gates: int = 16, iters: int = 100, products_per_iter: int = 8) -> float:
    """DPO-Convex's refit (replicated on every device) over one device's share of the step's model FLOPs,
    for a refit every step (it runs every `anchor.refresh_every` steps)."""
    refit = iters * products_per_iter * 2 * (2 * buffer) * dim * gates
    step = 6 * cfg.num_params() * sequences * length / devices
    return refit / step


def table(pairs: int, length: int, dtype: str) -> list[dict]:
    rows = []
    for name, cfg in MODELS.items():
        for layout in LAYOUTS:
            for n in DEVICES:
                shape = mesh_shape(layout, n)
                row = {"model": name, "layout": layout, "devices": n, "mesh": ",".join(map(str, shape.values()))}
                why = refusal(cfg, shape, pairs)
                if why:
                    row["refused"] = why
                else:
                    row.update({k: v / GIB for k, v in memory(cfg, shape, 2 * pairs, length, "dpo", dtype).items()})
                    row["communication"] = communication(cfg, shape, 2 * pairs, length, dtype) / GIB
                rows.append(row)
    return rows


def render(rows: list[dict], pairs: int, length: int, dtype: str) -> str:
    head = ("| model | mesh | devices | params | AdamW | reference | gradients | activations | with remat | "
            "comm / step |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['model']} | {r['mesh']} ({r['layout']}) | {r['devices']} | refused: {r['refused']} "
                         "| | | | | | |")
        else:
            lines.append(f"| {r['model']} | {r['mesh']} ({r['layout']}) | {r['devices']} | " + " | ".join(
                f"{r[k]:.3g}" for k in ("params", "optimizer", "reference", "gradients", "activations",
                                        "activations_remat", "communication")) + " |")
    return "\n".join(lines) + f"\n\nGiB per device; DPO with a frozen reference, {pairs} pairs ({2 * pairs} " \
        f"sequences) of {length} tokens per step, activations in {dtype} (logits in float32).\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=256, help="global batch, in pairs")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--dtype", choices=sorted(BYTES), default="bfloat16")
    parser.add_argument("--markdown", default=None, help="write the table into this file's generated section")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = table(args.pairs, args.length, args.dtype)
    text = render(rows, args.pairs, args.length, args.dtype)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pairs": args.pairs, "length": args.length, "dtype": args.dtype, "rows": rows}, f, indent=1)
    if args.markdown:
        replace_generated(args.markdown, text)


BEGIN, END = "<!-- generated by tools/scaling.py -->", "<!-- end generated -->"


def replace_generated(path: str, text: str) -> None:
    """Replaces the section between the BEGIN and END markers of `path` (the prose around it is written by hand)."""
    with open(path) as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        sys.exit(f"error: {path} has no {BEGIN} ... {END} section to fill")
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    with open(path, "w") as f:
        f.write(doc[:start] + "\n" + text + doc[end:])


if __name__ == "__main__":
    main()
