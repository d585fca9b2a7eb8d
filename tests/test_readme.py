"""The README's "Your first hour" commands, run as written (with fewer steps): quickstart, sampling from its
model, beta changed for the DPO-Convex stage only, the exported Hugging Face folder, the TensorBoard curves."""

import json
import os
import re
import shlex
import subprocess
import sys

from launch import common, stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "<!-- first-hour: executed by tests/test_readme.py -->"
FEWER_STEPS = ["--config.sft.train.steps=3", "--config.dpo_convex.train.steps=2",
               "--config.train.progress=false"]


def first_hour_commands() -> list[list[str]]:
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    block = re.search(re.escape(MARKER) + r"\n```bash\n(.*?)```", readme, re.S)
    assert block, "README lost its first-hour block"
    return [shlex.split(line) for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def _run(argv, tmp_path) -> str:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env={**env, "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_first_hour_commands_work_as_written(tmp_path):
    commands = first_hour_commands()
    assert [c[0] for c in commands] == ["python", "python", "python", "ls", "tensorboard"]
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")  # the README runs from the repository root
    outputs = []
    for argv in commands:
        if argv[0] == "python" and argv[2] == "launch.train":
            outputs.append(_run(argv + FEWER_STEPS, tmp_path))
        elif argv[0] == "python":
            outputs.append(_run(argv, tmp_path))
        elif argv[0] == "ls":  # the exported model with its tokenizer
            assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path / argv[1]))
        else:  # tensorboard --logdir DIR: every stage wrote event files under DIR
            logdir = tmp_path / argv[argv.index("--logdir") + 1]
            for stage in ("sft", "dpo_convex"):
                assert any(f.startswith("events.out") for f in os.listdir(logdir / stage / "tensorboard"))
    quickstart, sample, _ = outputs
    assert "== report" in quickstart and "runs/quickstart/dpo_convex/hf" in quickstart  # where the model went
    assert sample.startswith("> Can you walk me through ethics?\n")
    run_dir = common.model_directory(str(tmp_path / "runs/quickstart/dpo_convex"))
    assert common.model_tokenizer(run_dir).vocab_size <= 2048  # the run's own BPE, not GPT-2's 50257
    for workdir, beta in (("runs/quickstart", 0.1), ("runs/quickstart_beta", 0.5)):
        with open(tmp_path / workdir / "dpo_convex" / "config.json") as f:
            assert json.load(f)["loss"]["beta"] == beta
        with open(tmp_path / workdir / "sft" / "config.json") as f:
            assert json.load(f)["train"]["method"] == "sft"


def test_a_shared_override_reaches_every_stage_after_the_stage_values():
    from configs import quickstart

    config = quickstart.get_config()
    config.loss.beta = 0.7  # as --config.loss.beta=0.7 leaves it
    config.train.learning_rate = 1e-3
    for stage in ("sft", "dpo_convex"):
        c = stages.stage_config(config, stage, None, overrides=["loss.beta", "train.learning_rate"])
        assert c.loss.beta == 0.7 and c.train.learning_rate == 1e-3
        assert "stages" not in c and "sft" not in c
    without = stages.stage_config(config, "dpo_convex", None)  # no override given: the stage's own values win
    assert without.loss.beta == 0.1 and without.train.learning_rate == 2e-4
