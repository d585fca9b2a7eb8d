"""SFT on the hh data (the model DPO then starts from).

    python -m launch.train --config=configs/hh_sft.py --workdir=runs/hh_sft
"""

from configs import base


def get_config():
    return base.experiment("hh", "sft")
