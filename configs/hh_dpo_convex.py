"""DPO-Convex on the hh pairs: no reference model; the anchor is a convex ReLU network fitted by ADMM.

    python -m launch.train --config=configs/hh_sft.py --workdir=runs/hh_sft
    python -m launch.train --config=configs/hh_dpo_convex.py --workdir=runs/hh_dpo_convex \
        --config.train.init_from=runs/hh_sft --config.signal.name=margin
"""

from configs import base


def get_config():
    return base.experiment("hh", "dpo_convex")
