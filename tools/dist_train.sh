#!/usr/bin/env bash
# Distributed training with torchrun; works on CPU-only machines too (gloo).
#   bash tools/dist_train.sh CONFIG NUM_PROCS [train.py args...]
set -euo pipefail
CONFIG=$1
NPROC=$2
shift 2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python
PYTHONPATH="$ROOT:${PYTHONPATH:-}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" \
  "$PY" -m torch.distributed.run --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${PORT:-29500}" \
  --nproc_per_node="$NPROC" "$ROOT/tools/train.py" "$CONFIG" --launcher pytorch "$@"
