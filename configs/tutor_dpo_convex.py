"""DPO-Convex on the tutor pairs: no reference model; the anchor is a convex ReLU network fitted by ADMM.

    python -m launch.train --config=configs/tutor_sft.py --workdir=runs/tutor_sft
    python -m launch.train --config=configs/tutor_dpo_convex.py --workdir=runs/tutor_dpo_convex \
        --config.train.init_from=runs/tutor_sft --config.signal.name=margin
"""

from configs import base


def get_config():
    return base.experiment("tutor", "dpo_convex")
