"""DPO on the hh pairs with a frozen reference, from the SFT run's model.

    python -m launch.train --config=configs/hh_sft.py --workdir=runs/hh_sft
    python -m launch.train --config=configs/hh_dpo.py --workdir=runs/hh_dpo \
        --config.train.init_from=runs/hh_sft
"""

from configs import base


def get_config():
    return base.experiment("hh", "dpo")
