"""SFT on the imdb data (the model DPO then starts from).

    python -m launch.train --config=configs/imdb_sft.py --workdir=runs/imdb_sft
"""

from configs import base


def get_config():
    return base.experiment("imdb", "sft")
