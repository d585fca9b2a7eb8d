"""Train a GPT-2 with SFT, DPO or DPO-Convex on any mesh; resumes from the workdir's latest checkpoint.

    python -m launch.train --config=configs/tutor_dpo.py --workdir=runs/tutor_dpo
    python -m launch.train --config=configs/tutor_dpo.py --workdir=runs/x --config.train.beta=0.5 --mesh=2,2,2

A config whose `stages` field lists stage names (e.g. the quickstart's
"sft,dpo") runs them in order, each in <workdir>/<stage> and starting from the
previous one, then prints a report.
"""

import json
import os

from absl import flags
from ml_collections import config_flags

from cvxdpo.train.trainer import Trainer
from launch import common

CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (see configs/).", lock_config=False)
WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, exported model.")
flags.mark_flags_as_required(["config", "workdir"])


def with_mesh(config):
    if flags.FLAGS["mesh"].present:
        config.mesh = common.MESH.value
    return config


def main(argv):
    del argv
    config = with_mesh(CONFIG.value)
    if "stages" in config:
        from launch.quickstart import run_stages

        run_stages(config, WORKDIR.value)
        return
    report = Trainer(config, WORKDIR.value).run()
    print(json.dumps(report, indent=2))
    print(f"metrics: {os.path.join(WORKDIR.value, 'metrics.jsonl')}; model: {os.path.join(WORKDIR.value, 'hf')}")


if __name__ == "__main__":
    common.run(main)
