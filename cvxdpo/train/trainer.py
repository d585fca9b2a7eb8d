"""The training loop: SFT and DPO on any mesh, with evaluation, metrics, checkpoints and exact resume.

`Trainer(config, workdir).run()` builds everything from the config tree,
resumes from the workdir's latest checkpoint when there is one, and returns a
report of the held-out evaluation before and after training. A checkpoint
holds the whole train state (parameters, optimizer state, step, RNG, the frozen
reference when there is one) and the Grain iterator state, so a resumed run
reads exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx

from cvxdpo import config as config_lib
from cvxdpo import losses
from cvxdpo import mesh as mesh_lib
from cvxdpo.data import pipeline
from cvxdpo.errors import ConfigError, TrainingDiverged
from cvxdpo.model import gpt2, hub
from cvxdpo.train import data as data_lib
from cvxdpo.train import anchor, objectives, reference
from cvxdpo.train import state as state_lib
from cvxdpo.train import step as step_lib
from cvxdpo.train.checkpoint import Checkpointer
from cvxdpo.train.logs import MetricsWriter, Progress

SEQUENCE_KEYS = ("input_ids", "attention_mask", "loss_mask", "weight", "ref_logps")


def make_optimizer(t) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """RMSprop as torch has it (the official DPO optimizer) or AdamW, linear warm-up, global-norm clipping."""
    schedule = optax.warmup_constant_schedule(0.0, t.learning_rate, max(int(t.warmup_steps), 1))
    if t.optimizer == "rmsprop":
        opt = optax.rmsprop(schedule, decay=0.99, eps=1e-8, eps_in_sqrt=False)  # torch.optim.RMSprop defaults
    else:
        opt = optax.adamw(schedule, weight_decay=t.weight_decay)
    return (optax.chain(optax.clip_by_global_norm(t.grad_clip), opt) if t.grad_clip > 0 else opt), schedule


class Trainer:
    def __init__(self, config, workdir: str, devices=None):
        """`devices` (default: all) lets a program run the trainer on part of its devices."""
        config_lib.validate(config, workdir)
        self.c, self.workdir = config, os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.is_main = jax.process_index() == 0
        if self.is_main:
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2))
        self.mesh = mesh_lib.make_mesh(config.mesh, devices)
        mesh_lib.check_batch_divides(config.train.batch_size // config.train.micro_batches, self.mesh,
                                     "train.batch_size / train.micro_batches")
        self.cache_dir = config.data.cache_dir or os.path.join(self.workdir, "cache")
        self.tokenizer = data_lib.build_tokenizer(config, self.workdir)
        self.train_source, self.eval_source = data_lib.load_sources(config, self.tokenizer, self.cache_dir)
        self.tok_cfg = data_lib.tokenize_config(config)
        self.mode = "sft" if config.train.method == "sft" else "pairs"
        model_cfg, params = self._initial_model()
        self.model_cfg = model_cfg
        self.tx, self.schedule = make_optimizer(config.train)
        self.loss_cfg = losses.LossConfig(config.train.loss, config.train.beta, config.train.label_smoothing,
                                          config.train.simpo_gamma, config.train.ipo_normalize_length)
        self.convex = config.train.method == "dpo_convex"
        frozen = (config.train.method == "dpo" and self.loss_cfg.needs_reference
                  and config.train.reference == "frozen")
        self.anchor_cfg = anchor.AnchorConfig(
            dim=config.convex.dim, buffer=config.convex.buffer, refresh_every=config.convex.refresh_every,
            num_gates=config.convex.num_gates, reg=config.convex.reg, loss=config.convex.loss,
            admm_iters=config.convex.admm_iters, seed=config.train.seed)
        self.graphdef, self.state, self.shardings = state_lib.create_train_state(
            model_cfg, self.tx, self.mesh, seed=config.train.seed, params=params,
            reference_dtype=config.train.reference_dtype if frozen else None,
            extra=anchor.init(self.anchor_cfg, model_cfg.n_embd) if self.convex else None)
        self.objective = self._objective()
        self.ref_tables = self._precompute_reference()
        self.train_data = pipeline.make_dataset(
            self.train_source, self.tokenizer, self.tok_cfg, config.train.batch_size, mode=self.mode,
            seed=config.train.seed, worker_count=config.data.workers, ref_logps=self.ref_tables[0])
        self.train_iter = iter(self.train_data)
        self.train_step = step_lib.make_train_step(self.objective, self.tx, self.mesh, self.shardings,
                                                   config.train.micro_batches, self.schedule)
        self.eval_step = step_lib.make_eval_step(self.objective, self.mesh, self.shardings)
        self.checkpointer = Checkpointer(os.path.join(self.workdir, "checkpoints"), config.train.keep_checkpoints)
        latest = self.checkpointer.latest_step()
        if latest is not None:
            self.state = self.checkpointer.restore(latest, self.state, self.train_iter)
            logging.info("resumed from checkpoint %d in %s", latest, self.workdir)
        self.start_step = int(latest or 0)

    # --- setup -----------------------------------------------------------------------------------

    def _initial_model(self):
        """(GPT2Config, parameters or None for a fresh init) from init_from, a hub name/dir, or a preset."""
        c, tok = self.c, self.tokenizer
        numerics = dict(dtype=c.model.dtype, remat=c.model.remat, dropout=c.model.dropout)
        if c.train.init_from:
            source = data_lib.init_from_dir(c.train.init_from)
        elif c.model.init == "scratch":
            cfg = gpt2.preset(c.model.name, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                              bos_token_id=tok.eos_id, **numerics, **c.model.overrides.to_dict())
            return cfg, None
        else:
            source = c.model.name
        model = hub.load_pretrained(source, self.mesh, **numerics)
        if tok.vocab_size > model.cfg.vocab_size:
            raise ConfigError(f"tokenizer {tok.name!r} has {tok.vocab_size} tokens but the model only "
                              f"{model.cfg.vocab_size}")
        return model.cfg, nnx.state(model, nnx.Param)

    def _objective(self):
        if self.mode == "sft":
            return objectives.SFTObjective(self.graphdef)
        if self.convex:
            v = self.c.convex
            signal = losses.SignalConfig(v.signal, self.c.train.beta, v.gamma, v.tau, v.eps, v.normalize_length)
            return objectives.DPOConvexObjective(self.graphdef, self.loss_cfg, "none", signal, self.anchor_cfg)
        ref = "none" if not self.loss_cfg.needs_reference else self.c.train.reference
        return objectives.DPOObjective(self.graphdef, self.loss_cfg, ref)

    def _precompute_reference(self):
        """(train table, eval table) of reference log-probs, or (None, None)."""
        if not (isinstance(self.objective, objectives.DPOObjective) and self.objective.reference == "precomputed"):
            return None, None
        cache = os.path.join(self.workdir, "reference_logps")
        return tuple(reference.reference_logps(self.graphdef, self.state.params, src, self.tokenizer, self.tok_cfg,
                                               self.c.train.batch_size, self.mesh, cache)
                     for src in (self.train_source, self.eval_source))

    # --- evaluation ------------------------------------------------------------------------------

    def evaluate(self) -> dict:
        """Held-out metrics over the whole eval set (or train.eval_batches batches)."""
        bs = self.c.train.batch_size
        dataset = pipeline.make_dataset(self.eval_source, self.tokenizer, self.tok_cfg, bs, mode=self.mode,
                                        shuffle=False, num_epochs=1, ref_logps=self.ref_tables[1])
        n = pipeline.batches_per_pass(len(self.eval_source), bs, jax.process_count())
        if self.c.train.eval_batches:
            n = min(n, self.c.train.eval_batches)
        totals = None
        for batch in pipeline.padded_pass(dataset, n):
            sums = self.eval_step(self.state, self._place(batch))
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        totals = {k: float(v) for k, v in jax.device_get(totals).items()}
        if self.mode == "sft":
            return {"nll": totals["nll_sum"] / max(totals["tokens"], 1), "tokens": totals["tokens"]}
        pairs = max(totals.pop("pairs"), 1.0)
        out = {k: v / pairs for k, v in totals.items() if k != "loss_sum"}
        return {"loss": totals["loss_sum"] / pairs, **out, "pairs": pairs}

    # --- the loop --------------------------------------------------------------------------------

    def _place(self, batch: dict) -> dict:
        return mesh_lib.place_batch({k: v for k, v in batch.items() if k in SEQUENCE_KEYS}, self.mesh)

    def _check_finite(self, flag, step: int):
        if bool(flag):
            last = self.checkpointer.latest_step()
            raise TrainingDiverged(f"loss became NaN or infinite by step {step}; training stopped. The last good "
                                   f"checkpoint is step {last} in {self.workdir}/checkpoints")

    def run(self) -> dict:
        t = self.c.train
        writer = MetricsWriter(self.workdir, self.start_step)
        report = {"start_step": self.start_step}
        if self.start_step == 0:
            report["eval_before"] = writer.write(0, self.evaluate(), "eval/")
        progress = Progress(t.steps, self.start_step, t.progress)
        nonfinite = jnp.zeros((), bool)
        tokens, tic, t0 = 0, time.perf_counter(), time.perf_counter()
        step = logged = self.start_step
        step_times = []
        try:
            while step < t.steps:
                batch = next(self.train_iter)
                tokens += int(batch["attention_mask"].sum()) * jax.process_count()
                placed = self._place(batch)
                self.state, metrics = self.train_step(self.state, placed)
                nonfinite = nonfinite | ~jnp.isfinite(metrics["loss"])
                step += 1
                if step % t.log_every == 0 or step == t.steps:
                    self._check_finite(nonfinite, step)
                    elapsed = time.perf_counter() - tic
                    speed = tokens / elapsed
                    step_times.append(elapsed / (step - logged))
                    row = writer.write(step, {**jax.device_get(metrics), "time/tokens_per_s": speed,
                                              "time/step_s": step_times[-1]})
                    progress.update(step - logged, loss=row["loss"], tok_s=speed)
                    tokens, tic, logged = 0, time.perf_counter(), step
                if step % t.eval_every == 0 and step != t.steps:
                    writer.write(step, self.evaluate(), "eval/")
                    if logged == step:
                        tic = time.perf_counter()  # keep evaluation out of the next interval's step time
                if step % t.checkpoint_every == 0 or step == t.steps:
                    # The losses so far were computed before each update; probe the parameters about to be
                    # saved too, so that a checkpoint never holds parameters that already give NaN.
                    probe = self.eval_step(self.state, placed)
                    probe_ok = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(probe)]))
                    self._check_finite(nonfinite | ~probe_ok, step)
                    self.checkpointer.save(step, self.state, self.train_iter)
            report["eval_after"] = writer.write(step, self.evaluate(), "eval/")
            if self.convex and step_times:
                share = self.admm_share(sorted(step_times)[len(step_times) // 2])
                report["admm_share"] = writer.write(step, {"admm_share": share}, "time/")["time/admm_share"]
        finally:
            progress.close()
            writer.close()
            self.checkpointer.close()
        report.update(steps=step, train_seconds=time.perf_counter() - t0)
        self.export()
        return report

    def admm_share(self, step_seconds: float) -> float:
        """Fraction of step time spent in the anchor's ADMM refit: one refit, timed alone on the current
        anchor, over refresh_every steps (timing inside the jitted step would need host round-trips)."""
        refit = jax.jit(lambda s: anchor.refit(s, self.anchor_cfg))
        jax.block_until_ready(refit(self.state.extra))
        t = time.perf_counter()
        jax.block_until_ready(refit(self.state.extra))
        return (time.perf_counter() - t) / (self.anchor_cfg.refresh_every * step_seconds)

    def export(self) -> str:
        """The trained policy (and its tokenizer) in Hugging Face's layout at <workdir>/hf."""
        out = os.path.join(self.workdir, "hf")
        hub.save_pretrained(self.policy(), out)
        if self.is_main:
            self.tokenizer.save(out)
            with open(os.path.join(out, "cvxdpo.json"), "w") as f:
                json.dump({"step": int(self.state.step), "method": self.c.train.method}, f)
        return out

    def policy(self) -> gpt2.GPT2:
        return nnx.merge(self.graphdef, self.state.params)

