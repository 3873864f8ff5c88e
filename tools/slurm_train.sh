#!/usr/bin/env bash
# Train on a Slurm cluster: one task per GPU, tools/train.py --launcher=slurm
# (mmengine reads the ranks and the master node from Slurm's environment).
#
#   [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS="..."] [DRY_RUN=1] \
#     bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [train.py args...]
#
#   GPUS           tasks (= GPUs) in all, default 8; above GPUS_PER_NODE, several nodes
#   GPUS_PER_NODE  GPUs (and tasks) per node, default 8 (GPUS when GPUS < 8: one
#                  partial node, only the GPUs it uses)
#   CPUS_PER_TASK  CPU cores per task (data loading workers), default 5
#   SRUN_ARGS      extra srun options, split on spaces (e.g. "--quotatype=auto")
#   PYTHON         interpreter on the nodes, default python
#   DRY_RUN=1      print the command instead of running it
#
# Example: GPUS=16 bash tools/slurm_train.sh gpu dit_mrcnn \
#            configs/detection/mask_rcnn_dit_b2_3x.py work_dirs/mask_rcnn_dit_b2_3x --amp
set -euo pipefail

usage() {
    echo "usage: [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS=...] [DRY_RUN=1]" \
         "$0 PARTITION JOB_NAME CONFIG WORK_DIR [train.py args...]" >&2
    exit 2
}

[ $# -ge 4 ] || usage
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
WORK_DIR=$4
shift 4
PY_ARGS=("$@")

GPUS=${GPUS:-8}
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || { echo "$0: GPUS must be a positive integer, got '$GPUS'" >&2; usage; }
GPUS_PER_NODE=${GPUS_PER_NODE:-$(( GPUS < 8 ? GPUS : 8 ))}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
for var in GPUS_PER_NODE CPUS_PER_TASK; do
    if ! [[ ${!var} =~ ^[1-9][0-9]*$ ]]; then
        echo "$0: $var must be a positive integer, got '${!var}'" >&2
        usage
    fi
done
read -r -a SRUN_EXTRA <<< "${SRUN_ARGS:-}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

CMD=(srun -p "$PARTITION" --job-name="$JOB_NAME"
     --gres=gpu:"$GPUS_PER_NODE" --ntasks="$GPUS" --ntasks-per-node="$GPUS_PER_NODE"
     --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1
     ${SRUN_EXTRA[@]+"${SRUN_EXTRA[@]}"}
     "${PYTHON:-python}" -u "$ROOT/tools/train.py" "$CONFIG" --work-dir="$WORK_DIR"
     --launcher=slurm ${PY_ARGS[@]+"${PY_ARGS[@]}"})

if [ "${DRY_RUN:-0}" = 1 ]; then
    line=$(printf '%q ' "PYTHONPATH=$PYTHONPATH" "${CMD[@]}")
    echo "${line% }"
    exit 0
fi
exec "${CMD[@]}"
