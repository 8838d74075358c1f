#!/usr/bin/env bash
# SAFE training on a Cloud TPU VM pod slice: the same command on every worker, started together.
#
#   launch/tpu/train_pod.sh TPU_NAME ZONE launch/configs/sd15_safe.py --config.model=/mnt/models/sd15 \
#       --config.workdir=gs://BUCKET/runs/sd15_safe
#
# jax.distributed.initialize() finds the other workers through the TPU metadata, so no coordinator
# flags are needed. The repository and the models must be on every worker at the same path (a
# shared disk, or `gcloud ... scp --worker=all`); the workdir is a gs:// bucket path (orbax writes
# every worker's part of each checkpoint there) or a filesystem every worker shares. A maintenance
# event sends SIGTERM: the run saves at a step all workers agree on, and re-running this script
# resumes it, on this slice or on one of another size (keep --config.data.batch_size, pick a
# --config.mesh that fits the new slice).
set -euo pipefail

TPU_NAME=${1:?usage: train_pod.sh TPU_NAME ZONE CONFIG [--config.key=value ...]}
ZONE=${2:?zone}
CONFIG=${3:?config file}
shift 3
REPO=${REPO:-\$HOME/safe-jax}      # where the repository lives on the workers
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}

# Every worker at once; each prints its own log, prefixed by gcloud with the worker's number.
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="
  set -e
  cd $REPO
  [ -f .venv/bin/activate ] && source .venv/bin/activate
  export JAX_COMPILATION_CACHE_DIR=\${JAX_COMPILATION_CACHE_DIR:-\$HOME/.jax_cache}
  python -m launch.train --config '$CONFIG' --distributed=on $*
"
