"""DPO-Convex on the shp pairs: no reference model; the anchor is a convex ReLU network fitted by ADMM.

    python -m launch.train --config=configs/shp_sft.py --workdir=runs/shp_sft
    python -m launch.train --config=configs/shp_dpo_convex.py --workdir=runs/shp_dpo_convex \
        --config.train.init_from=runs/shp_sft --config.signal.name=margin
"""

from configs import base


def get_config():
    return base.experiment("shp", "dpo_convex")
