#!/bin/bash
# cvxdpo: python -m launch.train --config=configs/shp_dpo.py --workdir=runs/shp_dpo --mesh=-1,8,1
# on one host with 8 GPUs: one process sees them all; no coordinator.
set -euo pipefail
exec python -m launch.train --config=configs/shp_dpo.py --workdir=runs/shp_dpo --mesh=-1,8,1
