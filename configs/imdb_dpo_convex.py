"""DPO-Convex on the imdb pairs: no reference model; the anchor is a convex ReLU network fitted by ADMM.

    python -m launch.train --config=configs/imdb_sft.py --workdir=runs/imdb_sft
    python -m launch.train --config=configs/imdb_dpo_convex.py --workdir=runs/imdb_dpo_convex \
        --config.train.init_from=runs/imdb_sft --config.signal.name=margin
"""

from configs import base


def get_config():
    return base.experiment("imdb", "dpo_convex")
