"""Issue targets for calibration and the dial, measured on trained main-job runs.

    python benchmarks/budget_targets.py RUN_DIR [RUN_DIR ...] [--out FILE.json]
    python benchmarks/budget_targets.py --merge A.json B.json ... --out FILE.json

(``--merge`` combines the outputs of runs measured in separate processes,
e.g. one per core, into one table.)

RUN_DIR is a ``tools/main_job.sh`` work dir (``iter_300.pth`` and the
``calibrated.pth`` it wrote, calibrated to mu on the toy training images).
For each run:

* **calibration**: calibrate ``iter_300.pth`` to M in {0.5, 0.75, 1.0} on
  the training images (as ``tools/calibrate_budget.py --split train``), then
  measure the spend on the val images (target: M +- 0.03);
* **the dial**: on ``calibrated.pth`` set ``backbone.budget = B`` for B in
  {0.4, 0.6, 0.8} (the offset read off the stored curve, no recalibration)
  and measure the spend on the val images (target: B +- 0.05).

Spend = mean real backbone FLOPs / C_base over the images, eval mode.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

try:
    import dit_mm  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_mm import analysis
from dit_mm.analysis.calibration import calibrate, collect_inputs, spend, spend_at
from dit_mm.engine.hooks import find_dit

CONFIG = 'configs/detection/mask_rcnn_dit_b0_toy.py'
MUS = (0.5, 0.75, 1.0)
BUDGETS = (0.4, 0.6, 0.8)


def measure(run: Path, config: str) -> dict:
    cfg, model = analysis.load_model(config, str(run / 'iter_300.pth'))
    backbone = find_dit(model)
    train, val = collect_inputs(cfg, model, 'train'), collect_inputs(cfg, model, 'val')
    out: dict = dict(run=str(run), as_trained=dict(train=spend(backbone, train),
                                                    val=spend(backbone, val)), calibration={},
                     dial={})
    for mu in MUS:
        cal = calibrate(model, train, mu, progress=None, curve_gap=10.0)  # no curve needed
        val_spend = spend_at(backbone, val, cal.offset)
        out['calibration'][str(mu)] = dict(offset=cal.offset, train=cal.spend, val=val_spend,
                                           miss=val_spend - mu)
        print(f'{run.name}: mu {mu}: offset {cal.offset:+.3f}, train {cal.spend:.3f}, '
              f'val {val_spend:.3f} (miss {val_spend - mu:+.3f})', flush=True)
    _, calibrated = analysis.load_model(config, str(run / 'calibrated.pth'))
    cb = find_dit(calibrated)
    train, val = collect_inputs(cfg, calibrated, 'train'), collect_inputs(cfg, calibrated, 'val')
    for b in BUDGETS:
        cb.budget = b
        s, s_train = spend(cb, val), spend(cb, train)
        out['dial'][str(b)] = dict(offset=cb.gate_offset(), val=s, miss=s - b, train=s_train)
        print(f'{run.name}: dial {b}: offset {cb.gate_offset():+.3f}, train {s_train:.3f}, '
              f'val {s:.3f} (miss {s - b:+.3f})', flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('runs', nargs='*', help='main-job work dirs to measure')
    parser.add_argument('--merge', nargs='+', default=[], metavar='JSON',
                        help='earlier outputs of this script whose rows to include')
    parser.add_argument('--config', default=CONFIG)
    parser.add_argument('--out')
    args = parser.parse_args(argv)
    if not args.runs and not args.merge:
        parser.error('give run dirs to measure or --merge JSON files')
    rows = [row for f in args.merge for row in json.loads(Path(f).read_text())['rows']]
    rows += [measure(Path(r), args.config) for r in args.runs]
    summary = {}
    for kind, keys in (('calibration', MUS), ('dial', BUDGETS)):
        for k in keys:
            misses = [r[kind][str(k)]['miss'] for r in rows]
            summary[f'{kind} {k}'] = dict(max_abs_miss=max(abs(m) for m in misses),
                                          mean_miss=statistics.mean(misses))
    res = dict(rows=rows, summary=summary)
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == '__main__':
    main()
