"""Multi-stage runs (SFT then DPO, ...): each stage in <workdir>/<stage>, starting from the one before.

A config with a `stages` field (e.g. "sft,dpo_convex") holds the shared
sections plus one section per stage with that stage's overrides, by section
(`config.dpo_convex.loss.beta`). A command-line override of a shared field
(`--config.loss.beta=0.5`) reaches every stage, after the stage's own values;
`--config.<stage>.<section>.<field>` changes one stage.
"""

import copy
import os

import ml_collections

from cvxdpo.data.tokenizer import load_tokenizer
from cvxdpo.errors import ConfigError
from cvxdpo.model import generate, hub
from cvxdpo.train.trainer import Trainer

SAMPLE_PROMPTS = 3
TEMPERATURES = (0.0, 0.8)


def stage_names(config) -> list[str]:
    """The names in `config.stages`, each of which must have its section of overrides."""
    names = config.stages.split(",")
    for stage in names:
        if not isinstance(config.get(stage), ml_collections.ConfigDict):
            raise ConfigError(f"stages={config.stages!r} names stage {stage!r}, but the config has no section "
                              f"config.{stage} of its overrides")
    return names


def stage_config(config, stage: str, previous: str | None, overrides=()):
    """The config of one stage: the shared config, the stage's section overrides, then the dotted
    command-line `overrides` of shared fields (so that they win over the stage's values)."""
    c = copy.deepcopy(config)
    for section, values in config[stage].items():
        if section not in c:
            raise ConfigError(f"config.{stage}.{section} is not a config section")
        c[section].update(values)
    for key in overrides:
        if key.split(".")[0] not in stage_names(config):
            _set(c, key, _get(config, key))
    c.train.init_from = previous or c.train.init_from
    for name in ["stages", *stage_names(config)]:
        del c[name]
    return c


def _get(config, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def _set(config, key: str, value) -> None:
    *parents, last = key.split(".")
    for part in parents:
        config = config[part]
    config[last] = value


def run_stages(config, workdir: str, overrides=()) -> list[tuple[str, Trainer, dict]]:
    """Runs every stage in order; returns (stage, trainer, report) per stage. The stages share one cache
    (<workdir>/cache unless data.cache_dir says otherwise): data is downloaded or unpacked once."""
    results, previous = [], None
    for stage in stage_names(config):
        stage_dir = os.path.join(workdir, stage)
        print(f"== stage {stage} -> {stage_dir}", flush=True)
        c = stage_config(config, stage, previous, overrides)
        c.data.cache_dir = c.data.cache_dir or os.path.join(workdir, "cache")
        trainer = Trainer(c, stage_dir)
        results.append((stage, trainer, trainer.run()))
        previous = stage_dir
    return results


def _fmt(metrics: dict | None, key: str) -> str:
    """A held-out value, with its 95% interval when the report has one (`key` ending in /mean)."""
    if not metrics or key not in metrics:
        return "-"
    interval = key.removesuffix("/mean")
    if key.endswith("/mean") and f"{interval}/lo" in metrics:
        return f"{metrics[key]:.3f} [{metrics[interval + '/lo']:.3f}, {metrics[interval + '/hi']:.3f}]"
    return f"{metrics[key]:.3f}"


def _display(path: str) -> str:
    """Paths under the working directory as the user typed them (relative)."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def print_report(results) -> None:
    """Held-out metrics before -> after per stage, and replies sampled from the last stage's model."""
    print("\n== report")
    for stage, trainer, r in results:
        before, after = r.get("eval_before"), r.get("eval_after")
        print(f"[{stage}] {r['steps'] - r['start_step']} steps in {r['train_seconds']:.0f} s")
        if not before and not after:
            print("  no held-out evaluation (the held-out split is empty, e.g. data.eval_fraction=0)")
        elif trainer.mode == "sft":
            print(f"  held-out response NLL/token: {_fmt(before, 'eval/nll')} -> {_fmt(after, 'eval/nll')}")
        else:
            for key in ("accuracy/raw/mean", "accuracy/length_normalized/mean", "rewards/accuracies",
                        "rewards/margins", "loss"):
                print(f"  held-out {key.removesuffix('/mean')}: {_fmt(before, 'eval/' + key)} -> "
                      f"{_fmt(after, 'eval/' + key)}")
    _, trainer, report = results[-1]
    if report["hf"]:
        _print_samples(trainer, report["hf"])


def _print_samples(trainer, hf_dir: str) -> None:
    """Replies to the first held-out prompts (none without held-out examples)."""
    prompts = [trainer.eval_source[k].prompt for k in range(min(SAMPLE_PROMPTS, len(trainer.eval_source)))]
    if not prompts:
        return
    model = hub.load_pretrained(hf_dir, trainer.mesh)
    tok = load_tokenizer(hf_dir)
    for temperature in TEMPERATURES:
        replies = generate.generate_text(model, tok, prompts, 40, temperature=temperature, top_p=0.95, seed=0)
        print(f"\n-- samples at temperature {temperature}")
        for prompt, reply in zip(prompts, replies):
            print(f"> {prompt}\n  {reply.strip()}")


def print_outputs(results) -> None:
    """Where each stage's metrics, checkpoints and exported model are."""
    print("\n== outputs")
    for stage, _, r in results:
        workdir = _display(r["workdir"])
        print(f"[{stage}] metrics: {os.path.join(workdir, 'metrics.jsonl')}\n"
              f"  checkpoints: {os.path.join(workdir, 'checkpoints')}\n"
              f"  Hugging Face model: {_display(r['hf']) if r['hf'] else '(not exported: train.export_hf=false)'}\n"
              f"  curves: tensorboard --logdir {os.path.join(workdir, 'tensorboard')}")
