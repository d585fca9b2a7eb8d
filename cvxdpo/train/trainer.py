"""The training loop: SFT and DPO on any mesh, with evaluation, metrics, checkpoints and exact resume.

`Trainer(config, workdir).run()` builds everything from the config tree,
resumes from the workdir's latest checkpoint when there is one, and returns a
report of the held-out evaluation before and after training. A checkpoint
holds the whole train state (parameters, optimizer state, step, RNG, the frozen
reference when there is one) and the Grain iterator state, so a resumed run
reads exactly the batches an uninterrupted one would.

Every way a run can end leaves a workdir that a rerun of the same command
continues (see tests/test_faults.py): a SIGKILL at any point (checkpoints and
metrics files are replaced whole), a SIGTERM (the step is finished and
checkpointed first, see cvxdpo.train.stopping), a damaged newest checkpoint
(the one before is restored), divergence (the last good checkpoint is kept and
nothing is exported), a full disk (one line; the older checkpoints stay). A
rerun of a finished run trains and writes nothing (the model is exported
again); one under a config that changes the state's shapes is refused before
anything in the workdir changes.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from cvxdpo import config as config_lib
from cvxdpo import mesh as mesh_lib
from cvxdpo.data import pipeline
from cvxdpo.errors import ConfigError, DataError, TrainingDiverged, TrainingStopped
from cvxdpo.model import gpt2, hub
from cvxdpo.train import data as data_lib
from cvxdpo.train import objectives, reference
from cvxdpo.train import state as state_lib
from cvxdpo.train import step as step_lib
from cvxdpo.train.checkpoint import Checkpointer
from cvxdpo.train.evaluation import Evaluator
from cvxdpo.train.logs import METRICS_FILE, MetricsWriter, Progress, read_metrics
from cvxdpo.train.stopping import StopOnSigterm


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


def check_finite_weights(params, source: str) -> None:
    """ConfigError naming the first parameter of a loaded model with a NaN or infinite value: such weights load
    without complaint and would only show up as a diverged loss."""
    finite = jax.device_get(jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), params))  # one transfer
    for path, ok in jax.tree_util.tree_flatten_with_path(finite)[0]:
        if not ok:
            name = jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")
            raise ConfigError(f"{source} holds non-finite weights: parameter {name} has NaN or infinite values")


def check_positions(max_length: int, model_cfg: gpt2.GPT2Config) -> None:
    """ConfigError when a sequence can be longer than the model's position table: JAX clamps an out-of-range
    gather instead of failing, so every token past the last position would silently get that position's
    embedding."""
    if max_length > model_cfg.n_positions:
        raise ConfigError(f"data.max_length={max_length} is longer than the model's n_positions="
                          f"{model_cfg.n_positions}: lower data.max_length (a scratch model can instead raise "
                          "model.overrides.n_positions)")


def data_file_stamps(c) -> dict[str, tuple[int, int]]:
    """(size, modification time) of the data files the config names: their rows are read by byte offset all
    run long, so a file changed mid-run feeds garbage (see `Trainer.run`)."""
    paths = (c.data.path, c.data.eval_path)
    return {p: (os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths if p and os.path.isfile(p)}


def data_file_change(before: dict[str, tuple[int, int]], c) -> str | None:
    """How the first data file whose stamp is no longer the one in `before` changed, or None."""
    now = data_file_stamps(c)
    for path, stamp in before.items():
        if now.get(path) != stamp:
            return f"{path} changed during the run (size {stamp[0]} -> {now[path][0] if path in now else 'deleted'})"
    return None


def guarded(metrics: dict) -> dict:
    """The metrics the divergence guard bounds: the loss and the log-probs (keys holding "logps")."""
    return {k: v for k, v in metrics.items() if k == "loss" or "logps" in k}


@functools.partial(jax.jit, static_argnames=("max_abs_loss", "max_abs_logp"))
def diverged(flag, values: dict, max_abs_loss: float, max_abs_logp: float) -> jax.Array:
    """`flag`, or whether any of `values` is NaN or infinite, or its `loss` or a log-prob is larger in magnitude
    than max_abs_loss or max_abs_logp. A device scalar from one small program: checking every step costs no
    host sync. The range catches what a NaN check misses: at a learning rate of 1e6 the log-probs run to
    -1e16 while the DPO loss sits at a finite 0."""
    bad = [~jnp.all(jnp.isfinite(v)) for v in values.values()]
    bad += [jnp.any(jnp.abs(v) > (max_abs_logp if "logps" in k else max_abs_loss)) for k, v in guarded(values).items()]
    return flag | jnp.any(jnp.stack(bad))


class Trainer:
    def __init__(self, config, workdir: str, devices=None):
        """`devices` (default: all) lets a program run the trainer on part of its devices."""
        config_lib.validate(config, workdir)
        self.objective = objectives.build(config)
        self.bounds = dict(max_abs_loss=float(config.train.max_abs_loss),
                           max_abs_logp=float(config.train.max_abs_logp))
        self.c, self.workdir = config, os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.is_main = jax.process_index() == 0
        self.mesh = mesh_lib.make_mesh(config.mesh, devices)
        mesh_lib.check_batch_divides(config.train.batch_size // config.train.micro_batches, self.mesh,
                                     "train.batch_size / train.micro_batches")
        self.data_stamps = data_file_stamps(config)
        self.tokenizer, self.train_source, self.eval_source = self._load_data()
        tok_cfg = data_lib.tokenize_config(config)
        self.mode = "sft" if config.train.method == "sft" else "pairs"
        model_cfg, params = self._initial_model()
        check_positions(config.data.max_length, model_cfg)
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
        try:
            latest, self.state = self.checkpointer.restore(self.state, self.train_iter)
        except BaseException:
            self.checkpointer.close()  # else its threads print pages of "Event loop is closed" at exit
            raise
        if latest is not None:
            logging.info("resumed from checkpoint %d in %s", latest, self.workdir)
        self.start_step = int(latest or 0)
        if self.is_main:  # only now: a refused resume leaves the workdir's config.json as it was
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2))

    def _load_data(self):
        """(tokenizer, train source, held-out source). With several processes, process 0 loads first and the
        others once it has: what loading writes (a BPE trained into <workdir>/tokenizer, data downloaded or
        unpacked into data.cache_dir) is written by process 0 alone, on storage the processes may share, and
        the others read it back. A failure of process 0 is raised after the barrier, so that the others are not
        left waiting for it (they go on to load, and meet the same input)."""
        if jax.process_count() == 1:
            return data_lib.load_data(self.c, self.workdir)
        loaded = failure = None
        if self.is_main:
            try:
                loaded = data_lib.load_data(self.c, self.workdir)
            except Exception as e:  # noqa: BLE001 (raised again after the barrier)
                failure = e
        multihost_utils.sync_global_devices("data loaded by process 0")
        if failure is not None:
            raise failure
        return loaded if self.is_main else data_lib.load_data(self.c, self.workdir)

    def _initial_model(self):
        """(GPT2Config, parameters or None for a fresh init) from init_from, a hub name/dir, or a preset."""
        c, tok = self.c, self.tokenizer
        numerics = dict(dtype=c.model.dtype, remat=c.model.remat, remat_policy=c.model.remat_policy,
                        logprob_chunk=c.model.logprob_chunk)
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
        params = nnx.state(model, nnx.Param)
        check_finite_weights(params, source)
        return model.cfg, params

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

    def _stop_if_diverged(self, flag, step: int):
        if bool(flag):
            last = self.checkpointer.latest_step()
            kept = ("no checkpoint had been written yet, so a rerun starts from step 0" if last is None else
                    f"the last good checkpoint is step {last} in {self.checkpointer.directory}")
            raise TrainingDiverged(
                f"loss or log-probs became NaN, infinite or out of range by step {step} (train.max_abs_loss="
                f"{self.bounds['max_abs_loss']:g}, train.max_abs_logp={self.bounds['max_abs_logp']:g}); training "
                f"stopped, nothing exported; {kept}; lower train.learning_rate before rerunning")

    def _probe_before_save(self, placed, flag, step: int):
        """The losses so far were computed before each update; probe the parameters about to be saved too,
        so that a checkpoint never holds parameters that already give NaN or out-of-range values."""
        terms = self.evaluator.step(self.state, placed)
        mean_loss = terms["loss"].sum() / self.objective.denominator(placed)  # on the scale of the train loss
        self._stop_if_diverged(diverged(flag, {**terms, "loss": mean_loss}, **self.bounds), step)

    def _held_out_row(self, step: int) -> dict | None:
        """The held-out evaluation logged at `step` in metrics.jsonl, or None."""
        if not os.path.exists(os.path.join(self.workdir, METRICS_FILE)):
            return None
        rows = [r for r in read_metrics(self.workdir) if r["step"] == step and any(k.startswith("eval/") for k in r)]
        return {k: v for k, v in rows[-1].items() if k != "step"} if rows else None

    def _finished_report(self) -> dict:
        """The report of a rerun of a finished run (its checkpoint is at train.steps): the held-out rows read
        back from metrics.jsonl, which stays byte for byte as it was; nothing is trained or evaluated."""
        self.checkpointer.close()
        if self.start_step > self.c.train.steps:
            logging.warning("checkpoint %d in %s is past train.steps=%d: nothing to train", self.start_step,
                            self.workdir, self.c.train.steps)
        return {"start_step": self.start_step, "eval_before": self._held_out_row(0),
                "eval_after": self._held_out_row(self.start_step), "steps": self.start_step, "train_seconds": 0.0,
                "workdir": self.workdir, "hf": self.export() if self.c.train.export_hf else None}

    def run(self) -> dict:
        """Trains from the start step to train.steps; returns the held-out evaluation before and after.

        The last step's evaluation is logged before its checkpoint is written,
        so a checkpoint at train.steps means a finished run (see
        `_finished_report`). SIGTERM stops after the current step with a
        checkpoint of it and TrainingStopped. A data file that changes under
        the run (truncated, rewritten) makes reading fail in ways that do not
        name it; that failure becomes a DataError that does.
        """
        if self.start_step >= self.c.train.steps:
            return self._finished_report()
        try:
            return self._train()
        except (ValueError, OSError) as e:
            change = data_file_change(self.data_stamps, self.c)
            if change:
                raise DataError(f"data file {change}: its rows are read by byte offset, so it must stay as it was "
                                "until training ends; put it back to resume, or train on the new file in a new "
                                "--workdir") from e
            raise

    def _train(self) -> dict:
        t = self.c.train
        writer = MetricsWriter(self.workdir, self.start_step)
        report = {"start_step": self.start_step}
        if self.start_step == 0:
            report["eval_before"] = writer.write(0, self.evaluate(), "eval/")
        else:
            report["eval_before"] = self._held_out_row(0)
        progress = Progress(t.steps, self.start_step, t.progress)
        flag = jnp.zeros((), bool)  # set once the loss or log-probs leave their range (see `diverged`)
        tokens, tic, t0 = 0, time.perf_counter(), time.perf_counter()
        step = logged = self.start_step
        metrics = None
        try:
            with StopOnSigterm() as stop:
                while step < t.steps:
                    batch = next(self.train_iter)
                    batch_tokens = int(batch["attention_mask"].sum()) * jax.process_count()
                    tokens += batch_tokens
                    placed = step_lib.place_batch(batch, self.mesh)
                    previous = metrics
                    self.state, metrics = self.train_step(self.state, placed)
                    flag = diverged(flag, guarded(metrics), **self.bounds)
                    step += 1
                    progress.update(batch_tokens, previous)  # the step before: waiting on it keeps one step queued
                    if step % t.log_every == 0 or step == t.steps:
                        self._stop_if_diverged(flag, step)
                        elapsed = time.perf_counter() - tic
                        writer.write(step, {**jax.device_get(metrics), "time/tokens_per_s": tokens / elapsed,
                                            "time/step_s": elapsed / (step - logged)})
                        tokens, tic, logged = 0, time.perf_counter(), step
                    if step % t.eval_every == 0 or step == t.steps:
                        held_out = writer.write(step, self.evaluate(), "eval/")
                        if logged == step:
                            tic = time.perf_counter()  # keep evaluation out of the next interval's step time
                    stopping = step < t.steps and stop.requested(step)
                    if step % t.checkpoint_every == 0 or step == t.steps or stopping:
                        self._probe_before_save(placed, flag, step)
                        self.checkpointer.save(step, self.state, self.train_iter)
                    if stopping:
                        raise TrainingStopped(f"stopped by {stop.name} at step {step}; resume by rerunning the same "
                                              f"command (checkpoint {step} is in {self.checkpointer.directory})")
        finally:
            progress.close()
            writer.close()
            self.checkpointer.close()
        report.update(eval_after=held_out, steps=step, train_seconds=time.perf_counter() - t0, workdir=self.workdir,
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
