#!/usr/bin/env bash
# The main job, end to end on the CPU (the README's first command):
#   1. set up .venv (tools/install.sh; fast when cached)
#   2. generate the toy data set (data/toy)
#   3. train DiT-b0 Mask R-CNN with the budget loss (configs/detection/mask_rcnn_dit_b0_toy.py)
#   4. evaluate bbox and segm mAP (CocoMetric)
#   5. write the FLOPs report and the routing pictures
# and print mAP, real/expected FLOPs as fractions of C_base, and mu.
# Environment: WORK_DIR (default work_dirs/main_job), ITERS (default: the config's 300).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/install.sh
PY=.venv/bin/python
CFG=configs/detection/mask_rcnn_dit_b0_toy.py
WD="${WORK_DIR:-work_dirs/main_job}"
ITERS="${ITERS:-300}"
mkdir -p "$WD"
step() { echo; echo "=== [$(date +%H:%M:%S)] $*"; }

step "2/5 toy data"
$PY tools/make_toy_data.py --out data/toy

step "3/5 train ($ITERS iterations, log every 10)"
$PY tools/train.py "$CFG" --work-dir "$WD" --cfg-options \
  train_cfg.max_iters="$ITERS" train_cfg.val_interval=1000000 \
  "default_hooks.checkpoint.interval=$ITERS" "param_scheduler.1.end=$ITERS" \
  "custom_hooks.0.tau_anneal_iters=$ITERS"
CKPT="$WD/iter_$ITERS.pth"

step "4/5 evaluate (bbox + segm mAP on the toy val set)"
$PY tools/test.py "$CFG" "$CKPT" --work-dir "$WD/test" --metrics-json "$WD/metrics.json"

step "5/5 FLOPs report and routing pictures"
$PY tools/get_flops.py "$CFG" --checkpoint "$CKPT" --num-images 16 --out "$WD/flops.json"
$PY tools/visualize_routing.py "$CFG" --checkpoint "$CKPT" --index 0 --out "$WD/routing_0.png"
$PY tools/visualize_routing.py "$CFG" --checkpoint "$CKPT" --index 5 --out "$WD/routing_5.png"
$PY tools/routing_stats.py "$CFG" --checkpoint "$CKPT" --num-images 16 --out-dir "$WD/routing_stats"

$PY - "$WD" <<'PYEOF'
import json, sys
wd = sys.argv[1]
m = json.load(open(f'{wd}/metrics.json'))
f = json.load(open(f'{wd}/flops.json'))
r, g = f['ratios'], f['gflops']['backbone']
print('\n==================== main job summary ====================')
print(f"bbox mAP {m['coco/bbox_mAP']:.3f} (AP50 {m['coco/bbox_mAP_50']:.3f}), "
      f"segm mAP {m['coco/segm_mAP']:.3f} (AP50 {m['coco/segm_mAP_50']:.3f})  [toy val set]")
print(f"backbone FLOPs / C_base: real {r['real/C_base']:.3f}, expected "
      f"{r['expected/C_base']:.3f}, budget mu {f['mu']}")
print(f"  (C_base = PVTv2-b0 = {g['static']:.3f} GFLOPs/image, full grid {g['full']:.3f}; "
      f"averaged over {f['num_images']} val images)")
print(f"whole model real / PVTv2 model: {r['whole_real/whole_static']:.3f}")
print(f'outputs: {wd}/metrics.json, flops.json, routing_*.png, routing_stats/')
PYEOF
