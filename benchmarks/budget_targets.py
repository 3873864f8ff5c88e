"""Issue targets for calibration and the dial, measured on trained main-job runs.

    python benchmarks/budget_targets.py RUN_DIR [RUN_DIR ...] [--out FILE.json]
    python benchmarks/budget_targets.py --merge A.json B.json ... --out FILE.json

(``--merge`` combines the outputs of runs measured in separate processes,
e.g. one per core, into one table.)

RUN_DIR is a ``tools/main_job.sh`` work dir (``iter_300.pth`` and the
``calibrated.pth`` it wrote, calibrated to mu on the toy training images).
For each run:

* **calibration**: calibrate ``iter_300.pth`` to M in {0.5, 0.75, 1.0} on
  the training images the run's own calibration used (its
  ``calibration.json``: the main job's first 144; as
  ``tools/calibrate_budget.py --split train``), then
  measure the spend on the val images (target: M +- 0.03);
* **the dial**: on ``calibrated.pth`` set ``backbone.budget = B`` for B in
  {0.4, 0.6, 0.8} (the offset read off the stored curve, no recalibration)
  and measure the spend on the val images (target: B +- 0.05).

Spend = mean real backbone FLOPs / C_base over the images, eval mode.

``--fresh N`` also measures every offset on N images that neither training
nor calibration saw and that are not the val images either: a toy set drawn
from the same generator with another seed (``data/toy_fresh``). Next to
each mean it records its standard error over the images. This separates the
two reasons a val spend can miss its target: the val images being an
unlucky sample (then the fresh images spend what the training images do),
or the model spending differently on images it was not trained on (then the
fresh images miss the same way as the val images).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

try:
    import dit_mm  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_mm import analysis
from dit_mm.analysis.calibration import calibrate, collect_inputs, offset_applied, spends
from dit_mm.datasets.toy_data import generate_toy_dataset
from dit_mm.engine.hooks import find_dit

CONFIG = 'configs/detection/mask_rcnn_dit_b0_toy.py'
MUS = (0.5, 0.75, 1.0)
BUDGETS = (0.4, 0.6, 0.8)
#: seed of the fresh images' toy set (the main job's set has seed 0)
FRESH_SEED = 1000


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error."""
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float('nan')
    return statistics.mean(values), se


def fresh_config(cfg, root: Path, num_images: int):
    """``cfg`` with its val split on ``num_images`` new toy images under ``root``."""
    generate_toy_dataset(root, num_train=0, num_val=num_images, seed=FRESH_SEED)
    fresh = copy.deepcopy(cfg)
    fresh.val_dataloader.dataset.data_root = str(root / 'coco') + '/'
    return fresh


def calibration_images(run: Path) -> int | None:
    """How many training images the run's own calibration used (its
    ``calibration.json``; ``None``: all)."""
    report = run / 'calibration.json'
    return json.loads(report.read_text()).get('num_images') if report.exists() else None


def _sets(cfg, fresh_cfg, model, num_train: int | None = None) -> dict:
    sets = dict(train=collect_inputs(cfg, model, 'train', num_train),
                val=collect_inputs(cfg, model, 'val'))
    if fresh_cfg is not None:
        sets['fresh'] = collect_inputs(fresh_cfg, model, 'val')
    return sets


def _row(backbone, sets: dict, target: float | None) -> dict:
    """Mean spend and its standard error on every image set, as the model is set."""
    row: dict = {}
    for name, inputs in sets.items():
        row[name], row[f'{name}_se'] = mean_se(spends(backbone, inputs))
    if target is not None:
        row['miss'] = row['val'] - target
        if 'fresh' in row:
            row['fresh_miss'] = row['fresh'] - target
    return row


def _say(run: Path, what: str, row: dict) -> None:
    fresh = (f", fresh {row['fresh']:.3f} ± {row['fresh_se']:.3f}" if 'fresh' in row else '')
    print(f"{run.name}: {what}: train {row['train']:.3f}, val {row['val']:.3f} "
          f"± {row['val_se']:.3f}{fresh}", flush=True)


def measure(run: Path, config: str, fresh: int = 0) -> dict:
    cfg, model = analysis.load_model(config, str(run / 'iter_300.pth'))
    backbone = find_dit(model)
    fresh_cfg = fresh_config(cfg, Path('data/toy_fresh'), fresh) if fresh else None
    sets = _sets(cfg, fresh_cfg, model, calibration_images(run))
    out: dict = dict(run=str(run), num_train=len(sets['train']),
                     as_trained=_row(backbone, sets, None), calibration={}, dial={})
    _say(run, 'as trained', out['as_trained'])
    for mu in MUS:
        cal = calibrate(model, sets['train'], mu, progress=None, curve_gap=10.0)  # no curve
        with offset_applied(backbone, cal.offset):
            row = _row(backbone, sets, mu)
        out['calibration'][str(mu)] = dict(offset=cal.offset, **row)
        _say(run, f'mu {mu} (offset {cal.offset:+.3f})', row)
    _, calibrated = analysis.load_model(config, str(run / 'calibrated.pth'))
    cb = find_dit(calibrated)  # same config, same preprocessing: the inputs above serve
    for b in BUDGETS:
        cb.budget = b
        row = _row(cb, sets, b)
        out['dial'][str(b)] = dict(offset=cb.gate_offset(), **row)
        _say(run, f'dial {b} (offset {cb.gate_offset():+.3f})', row)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('runs', nargs='*', help='main-job work dirs to measure')
    parser.add_argument('--merge', nargs='+', default=[], metavar='JSON',
                        help='earlier outputs of this script whose rows to include')
    parser.add_argument('--config', default=CONFIG)
    parser.add_argument('--fresh', type=int, default=0, metavar='N',
                        help='also measure on N new toy images (data/toy_fresh)')
    parser.add_argument('--out')
    args = parser.parse_args(argv)
    if not args.runs and not args.merge:
        parser.error('give run dirs to measure or --merge JSON files')
    rows = [row for f in args.merge for row in json.loads(Path(f).read_text())['rows']]
    rows += [measure(Path(r), args.config, args.fresh) for r in args.runs]
    summary = {}
    for kind, keys in (('calibration', MUS), ('dial', BUDGETS)):
        for k in keys:
            misses = [r[kind][str(k)]['miss'] for r in rows]
            summary[f'{kind} {k}'] = dict(max_abs_miss=max(abs(m) for m in misses),
                                          mean_miss=statistics.mean(misses))
            fresh = [r[kind][str(k)]['fresh_miss'] for r in rows
                     if 'fresh_miss' in r[kind][str(k)]]
            if fresh:
                summary[f'{kind} {k}'].update(fresh_max_abs_miss=max(abs(m) for m in fresh),
                                              fresh_mean_miss=statistics.mean(fresh))
    res = dict(rows=rows, summary=summary)
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == '__main__':
    main()
