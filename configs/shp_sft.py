"""SFT on the shp data (the model DPO then starts from).

    python -m launch.train --config=configs/shp_sft.py --workdir=runs/shp_sft
"""

from configs import base


def get_config():
    return base.experiment("shp", "sft")
