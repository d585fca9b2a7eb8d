#!/bin/bash
# cvxdpo: python -m launch.train --config=configs/shp_dpo.py --workdir=runs/shp_dpo --mesh=-1,8,1
# on every worker of a TPU VM pod, one process per worker; JAX reads the pod's layout (--multihost).
# Usage: TPU_NAME=my-pod ZONE=us-central2-b bash launch/cluster/tpu_pod.sh
set -euo pipefail
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
    --command='cd cvxdpo && python -m launch.train --config=configs/shp_dpo.py --workdir=runs/shp_dpo --mesh=-1,8,1 --multihost'
