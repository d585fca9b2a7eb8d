"""SFT on the tutor data (the model DPO then starts from).

    python -m launch.train --config=configs/tutor_sft.py --workdir=runs/tutor_sft
"""

from configs import base


def get_config():
    return base.experiment("tutor", "sft")
