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
from cvxdpo import mesh as mesh_lib
from cvxdpo.data import pipeline
from cvxdpo.errors import ConfigError, TrainingDiverged
from cvxdpo.model import gpt2, hub
from cvxdpo.train import data as data_lib
from cvxdpo.train import objectives, reference
from cvxdpo.train import state as state_lib
from cvxdpo.train import step as step_lib
from cvxdpo.train.checkpoint import Checkpointer
from cvxdpo.train.evaluation import Evaluator
from cvxdpo.train.logs import MetricsWriter, Progress


def make_optimizer(t) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """RMSprop as torch has it (the official DPO optimizer) or AdamW, linear warm-up, global-norm clipping.

    `train.schedule="cosine"` decays to a tenth of the peak over `train.steps`: how a from-scratch SFT
    reaches its plateau within a fixed budget (the preference runs keep the papers' constant rate)."""
    warmup = max(int(t.warmup_steps), 1)
    if t.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, warmup, max(int(t.steps), warmup + 1),
                                                      end_value=t.learning_rate / 10)
    else:
        schedule = optax.warmup_constant_schedule(0.0, t.learning_rate, warmup)
    if t.optimizer == "rmsprop":
        opt = optax.rmsprop(schedule, decay=0.99, eps=1e-8, eps_in_sqrt=False)  # torch.optim.RMSprop defaults
    else:
        opt = optax.adamw(schedule, weight_decay=t.weight_decay)
    return (optax.chain(optax.clip_by_global_norm(t.grad_clip), opt) if t.grad_clip > 0 else opt), schedule


class Trainer:
    def __init__(self, config, workdir: str, devices=None):
        """`devices` (default: all) lets a program run the trainer on part of its devices."""
        config_lib.validate(config, workdir)
        self.objective = objectives.build(config)
        self.c, self.workdir = config, os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.is_main = jax.process_index() == 0
        if self.is_main:
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2))
        self.mesh = mesh_lib.make_mesh(config.mesh, devices)
        mesh_lib.check_batch_divides(config.train.batch_size // config.train.micro_batches, self.mesh,
                                     "train.batch_size / train.micro_batches")
        self.tokenizer, self.train_source, self.eval_source = data_lib.load_data(config, self.workdir)
        tok_cfg = data_lib.tokenize_config(config)
        self.mode = "sft" if config.train.method == "sft" else "pairs"
        model_cfg, params = self._initial_model()
        tx, schedule = make_optimizer(config.train)
        seed = config.train.seed
        self.graphdef, self.state, self.shardings = state_lib.create_train_state(
            model_cfg, tx, self.mesh, seed=seed, params=params, reference_dtype=self.objective.reference_dtype,
            extra=self.objective.init_extra(model_cfg.n_embd, seed))
        self.ref_tables = train_ref, eval_ref = self._precompute_reference(tok_cfg)
        self.train_iter = iter(pipeline.make_dataset(
            self.train_source, self.tokenizer, tok_cfg, config.train.batch_size, mode=self.mode, seed=seed,
            worker_count=config.data.workers, ref_logps=train_ref))
        self.train_step = step_lib.make_train_step(self.objective, self.graphdef, tx, self.mesh, self.shardings,
                                                   config.train.micro_batches, schedule)
        self.evaluator = Evaluator(self.objective, self.graphdef, self.mesh, self.shardings, self.eval_source,
                                   self.tokenizer, tok_cfg, config.train.batch_size, self.mode, eval_ref,
                                   beta=config.loss.beta, seed=seed)
        self.checkpointer = Checkpointer(os.path.join(self.workdir, "checkpoints"), config.train.keep_checkpoints)
        latest = self.checkpointer.latest_step()
        if latest is not None:
            self.state = self.checkpointer.restore(latest, self.state, self.train_iter)
            logging.info("resumed from checkpoint %d in %s", latest, self.workdir)
        self.start_step = int(latest or 0)

    def _initial_model(self):
        """(GPT2Config, parameters or None for a fresh init) from init_from, a hub name/dir, or a preset."""
        c, tok = self.c, self.tokenizer
        numerics = dict(dtype=c.model.dtype, remat=c.model.remat)
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

    def _precompute_reference(self, tok_cfg):
        """(train table, held-out table) of reference log-probs, or (None, None)."""
        if not self.objective.precomputed_reference:
            return None, None
        cache = os.path.join(self.workdir, "reference_logps")
        return tuple(reference.reference_logps(self.graphdef, self.state.params, src, self.tokenizer, tok_cfg,
                                               self.c.train.batch_size, self.mesh, cache)
                     for src in (self.train_source, self.eval_source))

    def evaluate(self) -> dict:
        """Held-out metrics of the current state (see cvxdpo.train.evaluation)."""
        return self.evaluator(self.state)

    def _check_finite(self, flag, step: int):
        if bool(flag):
            last = self.checkpointer.latest_step()
            raise TrainingDiverged(f"loss became NaN or infinite by step {step}; training stopped. The last good "
                                   f"checkpoint is step {last} in {self.workdir}/checkpoints")

    def _probe_before_save(self, placed, nonfinite, step: int):
        """The losses so far were computed before each update; probe the parameters about to be saved too,
        so that a checkpoint never holds parameters that already give NaN."""
        probe = self.evaluator.step(self.state, placed)
        probe_ok = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(probe)]))
        self._check_finite(nonfinite | ~probe_ok, step)

    def run(self) -> dict:
        """Trains from the start step to train.steps; returns the held-out evaluation before and after."""
        t = self.c.train
        writer = MetricsWriter(self.workdir, self.start_step)
        report = {"start_step": self.start_step}
        if self.start_step == 0:
            report["eval_before"] = writer.write(0, self.evaluate(), "eval/")
        progress = Progress(t.steps, self.start_step, t.progress)
        nonfinite = jnp.zeros((), bool)
        tokens, tic, t0 = 0, time.perf_counter(), time.perf_counter()
        step = logged = self.start_step
        metrics = None
        try:
            while step < t.steps:
                batch = next(self.train_iter)
                batch_tokens = int(batch["attention_mask"].sum()) * jax.process_count()
                tokens += batch_tokens
                placed = step_lib.place_batch(batch, self.mesh)
                previous = metrics
                self.state, metrics = self.train_step(self.state, placed)
                nonfinite = nonfinite | ~jnp.isfinite(metrics["loss"])
                step += 1
                progress.update(batch_tokens, previous)  # the step before: waiting on it keeps one step queued
                if step % t.log_every == 0 or step == t.steps:
                    self._check_finite(nonfinite, step)
                    elapsed = time.perf_counter() - tic
                    writer.write(step, {**jax.device_get(metrics), "time/tokens_per_s": tokens / elapsed,
                                        "time/step_s": elapsed / (step - logged)})
                    tokens, tic, logged = 0, time.perf_counter(), step
                if step % t.eval_every == 0 and step != t.steps:
                    writer.write(step, self.evaluate(), "eval/")
                    if logged == step:
                        tic = time.perf_counter()  # keep evaluation out of the next interval's step time
                if step % t.checkpoint_every == 0 or step == t.steps:
                    self._probe_before_save(placed, nonfinite, step)
                    self.checkpointer.save(step, self.state, self.train_iter)
            report["eval_after"] = writer.write(step, self.evaluate(), "eval/")
        finally:
            progress.close()
            writer.close()
            self.checkpointer.close()
        report.update(steps=step, train_seconds=time.perf_counter() - t0, workdir=self.workdir,
                      hf=self.export() if t.export_hf else None)
        return report

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
