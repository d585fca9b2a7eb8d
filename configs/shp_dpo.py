"""DPO on the shp pairs with a frozen reference, from the SFT run's model.

    python -m launch.train --config=configs/shp_sft.py --workdir=runs/shp_sft
    python -m launch.train --config=configs/shp_dpo.py --workdir=runs/shp_dpo \
        --config.train.init_from=runs/shp_sft
"""

from configs import base


def get_config():
    return base.experiment("shp", "dpo")
