"""Multi-stage runs (SFT then DPO, ...) and the quickstart's printed report."""

import copy
import os

from cvxdpo.data.tokenizer import load_tokenizer
from cvxdpo.model import generate, hub
from cvxdpo.train.trainer import Trainer

SAMPLE_PROMPTS = 3
TEMPERATURES = (0.0, 0.8)


def stage_config(config, stage: str, previous: str | None):
    """The config of one stage: the shared config with the stage's dotted overrides applied."""
    c = copy.deepcopy(config)
    for section, values in config[stage].items():
        c[section].update(values)
    c.train.init_from = previous or c.train.init_from
    for name in ["stages", *config.stages.split(",")]:
        del c[name]
    return c


def run_stages(config, workdir: str) -> list[dict]:
    reports, previous = [], None
    for stage in config.stages.split(","):
        stage_dir = os.path.join(workdir, stage)
        print(f"== stage {stage} -> {stage_dir}", flush=True)
        trainer = Trainer(stage_config(config, stage, previous), stage_dir)
        reports.append((stage, trainer, trainer.run()))
        previous = stage_dir
    print_report(reports)
    return [r for _, _, r in reports]


def _fmt(metrics: dict | None, key: str) -> str:
    return "-" if not metrics or key not in metrics else f"{metrics[key]:.3f}"


def print_report(reports) -> None:
    print("\n== report")
    for stage, trainer, r in reports:
        before, after = r.get("eval_before"), r.get("eval_after")
        print(f"[{stage}] {r['steps'] - r['start_step']} steps in {r['train_seconds']:.0f} s")
        if trainer.mode == "sft":
            print(f"  held-out response NLL/token: {_fmt(before, 'eval/nll')} -> {_fmt(after, 'eval/nll')}")
        else:
            for key in ("preference_accuracy", "rewards/accuracies", "rewards/margins", "loss"):
                print(f"  held-out {key}: {_fmt(before, 'eval/' + key)} -> {_fmt(after, 'eval/' + key)}")
    _, trainer, _ = reports[-1]
    model = hub.load_pretrained(os.path.join(trainer.workdir, "hf"), trainer.mesh)
    tok = load_tokenizer(os.path.join(trainer.workdir, "hf"))
    prompts = [trainer.eval_source[k].prompt for k in range(min(SAMPLE_PROMPTS, len(trainer.eval_source)))]
    for temperature in TEMPERATURES:
        replies = generate.generate_text(model, tok, prompts, 40, temperature=temperature, top_p=0.95, seed=0)
        print(f"\n-- samples at temperature {temperature}")
        for prompt, reply in zip(prompts, replies):
            print(f"> {prompt}\n  {reply.strip()}")
