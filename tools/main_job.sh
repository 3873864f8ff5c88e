#!/usr/bin/env bash
# The main job, end to end on the CPU (the README's first command):
#   1. set up .venv (tools/install.sh; fast when cached)
#   2. generate the toy data set (data/toy)
#   3. train DiT-b0 Mask R-CNN with the budget loss (configs/detection/mask_rcnn_dit_b0_toy.py)
#   4. calibrate it to spend mu on the toy training images (tools/calibrate_budget.py)
#   5. evaluate bbox and segm mAP (CocoMetric), as trained and calibrated
#   6. write the FLOPs reports and the routing pictures
# and print mAP, real/expected FLOPs as fractions of C_base against mu, before
# and after calibration.
# Environment: WORK_DIR (default work_dirs/main_job), ITERS (default: the config's 300),
# SEED (default: the config's 0).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/install.sh
PY=.venv/bin/python
CFG=configs/detection/mask_rcnn_dit_b0_toy.py
WD="${WORK_DIR:-work_dirs/main_job}"
ITERS="${ITERS:-300}"
SEED="${SEED:-0}"
MU=$($PY -c "import sys; sys.path.insert(0, '.'); from dit_mm import analysis; \
print(analysis.budget_mu(analysis.load_config('$CFG')))")
mkdir -p "$WD"
step() { echo; echo "=== [$(date +%H:%M:%S)] $*"; }

step "2/6 toy data"
$PY tools/make_toy_data.py --out data/toy

step "3/6 train ($ITERS iterations, log every 10, seed $SEED)"
$PY tools/train.py "$CFG" --work-dir "$WD" --cfg-options \
  train_cfg.max_iters="$ITERS" train_cfg.val_interval=1000000 \
  "default_hooks.checkpoint.interval=$ITERS" "param_scheduler.1.end=$ITERS" \
  "custom_hooks.0.tau_anneal_iters=$ITERS" randomness.seed="$SEED" \
  custom_hooks.0.seed="$SEED" custom_hooks.1.seed="$SEED"
CKPT="$WD/iter_$ITERS.pth"
CAL="$WD/calibrated.pth"

step "4/6 calibrate to mu=$MU on 144 of the toy training images"
$PY tools/calibrate_budget.py "$CFG" "$CKPT" --mu "$MU" --split train --num-images 144 \
  --out "$CAL" --report "$WD/calibration.json"

step "5/6 evaluate (bbox + segm mAP on the toy val set), as trained and calibrated"
$PY tools/test.py "$CFG" "$CKPT" --work-dir "$WD/test" --metrics-json "$WD/metrics_trained.json"
$PY tools/test.py "$CFG" "$CAL" --work-dir "$WD/test" --metrics-json "$WD/metrics.json"

step "6/6 FLOPs reports and routing pictures (calibrated model)"
$PY tools/get_flops.py "$CFG" --checkpoint "$CKPT" --num-images 144 --backbone-only \
  --out "$WD/flops_trained.json"
CKPT="$CAL"
$PY tools/get_flops.py "$CFG" --checkpoint "$CKPT" --num-images 144 --out "$WD/flops.json"
$PY tools/visualize_routing.py "$CFG" --checkpoint "$CKPT" --index 0 --out "$WD/routing_0.png"
$PY tools/visualize_routing.py "$CFG" --checkpoint "$CKPT" --index 5 --out "$WD/routing_5.png"
$PY tools/routing_stats.py "$CFG" --checkpoint "$CKPT" --num-images 144 --out-dir "$WD/routing_stats"

$PY - "$WD" <<'PYEOF'
import json, sys
wd = sys.argv[1]
m = json.load(open(f'{wd}/metrics.json'))
m0 = json.load(open(f'{wd}/metrics_trained.json'))
f = json.load(open(f'{wd}/flops.json'))
f0 = json.load(open(f'{wd}/flops_trained.json'))
c = json.load(open(f'{wd}/calibration.json'))
r, g = f['ratios'], f['gflops']['backbone']
mu = f['mu']
print('\n==================== main job summary ====================')
print(f"bbox mAP {m['coco/bbox_mAP']:.3f} (AP50 {m['coco/bbox_mAP_50']:.3f}), "
      f"segm mAP {m['coco/segm_mAP']:.3f} (AP50 {m['coco/segm_mAP_50']:.3f})  [toy val set, "
      f"calibrated; as trained: bbox {m0['coco/bbox_mAP']:.3f}, segm {m0['coco/segm_mAP']:.3f}]")
print(f"backbone FLOPs / C_base on the val images, budget mu {mu}:")
print(f"  as trained: real {f0['ratios']['real/C_base']:.3f} (miss "
      f"{f0['ratios']['real/C_base'] - mu:+.3f}), expected {f0['ratios']['expected/C_base']:.3f}")
print(f"  calibrated: real {r['real/C_base']:.3f} (miss {r['real/C_base'] - mu:+.3f}); "
      f"gate offset {c['offset']:+.3f} found on {c['num_images']} {c['split']} images "
      f"(there {c['spend_before']:.3f} -> {c['spend']:.3f})")
print(f"  dial: budgets {c['spend_range'][0]:.2f} .. {c['spend_range'][1]:.2f} from this "
      "checkpoint: tools/test.py ... --budget B")
print(f"  (C_base = PVTv2-b0 = {g['static']:.3f} GFLOPs/image, full grid {g['full']:.3f}; "
      f"averaged over {f['num_images']} val images)")
print(f"whole model real / PVTv2 model: {r['whole_real/whole_static']:.3f}")
print(f'outputs: {wd}/calibrated.pth, metrics*.json, flops*.json, calibration.json, '
      'routing_*.png, routing_stats/')
PYEOF
