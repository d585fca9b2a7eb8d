"""DPO on the imdb pairs with a frozen reference, from the SFT run's model.

    python -m launch.train --config=configs/imdb_sft.py --workdir=runs/imdb_sft
    python -m launch.train --config=configs/imdb_dpo.py --workdir=runs/imdb_dpo \
        --config.train.init_from=runs/imdb_sft
"""

from configs import base


def get_config():
    return base.experiment("imdb", "dpo")
