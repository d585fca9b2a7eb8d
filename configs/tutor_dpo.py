"""DPO on the Educational-Tutor pairs (alternating strategy), from an SFT run's model.

    python -m launch.train --config=configs/tutor_sft.py --workdir=runs/tutor_sft
    python -m launch.train --config=configs/tutor_dpo.py --workdir=runs/tutor_dpo \
        --config.train.init_from=runs/tutor_sft
"""

from configs import base


def get_config():
    return base.experiment("tutor", "dpo")
