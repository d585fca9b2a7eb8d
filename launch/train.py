"""Train a GPT-2 with SFT, DPO or DPO-Convex on any mesh; resumes from the workdir's latest checkpoint.

    python -m launch.train --config=configs/tutor_dpo.py --workdir=runs/tutor_dpo
    python -m launch.train --config=configs/tutor_dpo.py --workdir=runs/x --config.loss.beta=0.5 --mesh=2,2,2

A config whose `stages` field lists stage names (e.g. the quickstart's
"sft,dpo_convex") runs them in order, each in <workdir>/<stage> and starting
from the previous one, then prints a report (see launch/stages.py).
"""

import json

from absl import flags
from ml_collections import config_flags

from cvxdpo.train.trainer import Trainer
from launch import common, stages

CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (see configs/).", lock_config=False)
WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, exported model.")
flags.mark_flags_as_required(["config", "workdir"])
flags.adopt_module_key_flags(common)  # --help lists --mesh, --debug and the multi-host flags too


def main(argv):
    del argv
    config = CONFIG.value
    if flags.FLAGS["mesh"].present:
        config.mesh = common.MESH.value
    if "stages" in config:
        overrides = list(config_flags.get_override_values(flags.FLAGS["config"]))
        results = stages.run_stages(config, WORKDIR.value, overrides)
        stages.print_report(results)
    else:
        trainer = Trainer(config, WORKDIR.value)
        report = trainer.run()
        print(json.dumps(report, indent=2))
        results = [("run", trainer, report)]
    stages.print_outputs(results)


if __name__ == "__main__":
    common.run(main)
