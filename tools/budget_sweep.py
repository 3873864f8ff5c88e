"""Accuracy against real FLOPs of one calibrated DiT at many budgets: the
calibrated dial next to the uniform keep ratio.

    python tools/budget_sweep.py CONFIG CALIBRATED.pth --budgets 0.4 0.6 0.8 1.0 \\
        [--keep-ratios 0.3 0.5 0.7 1.0] --out-dir DIR

At each budget ``B`` the backbone's ``budget`` is set (the offset is read
off the spend curve that ``tools/calibrate_budget.py`` stored); at each keep
ratio ``r`` every gated node keeps its top ``r`` of tokens by gate score
instead. Each point is one pass over the config's val (``--split``) set:
the task metric (bbox/segm mAP, mIoU or top-1, from the config's evaluator)
and the real backbone FLOPs / C_base of the routes taken in that very pass.
Written to DIR: ``budget_sweep.json``, ``budget_sweep.md`` and
``budget_sweep.png`` (metric against real FLOPs, one curve per dial).

The spend is read from the backbone's last forward of each image: right for
detectors, classifiers and mmseg's ``mode='whole'`` inference; with mmseg's
sliding-window inference it is the last window's.
"""
from __future__ import annotations

import argparse
import json
import os.path as osp
import sys
import time
from pathlib import Path
from typing import Any

try:
    import dit_mm  # noqa: F401
except ImportError:  # running from a checkout without an installed dit_mm
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from dit_mm import analysis
from dit_mm.engine.hooks import find_dit
from dit_mm.models.budget_dial import CALIBRATE_HINT

#: the metric plotted, first found in the evaluator's results
MAIN_METRICS = ('coco/bbox_mAP', 'coco/segm_mAP', 'mIoU', 'accuracy/top1')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='mmdet / mmseg / mmpretrain config of the model')
    parser.add_argument('checkpoint', help='calibrated checkpoint (tools/calibrate_budget.py)')
    parser.add_argument('--budgets', type=float, nargs='*', default=[0.4, 0.6, 0.8, 1.0],
                        help='budgets (x C_base) for the calibrated dial')
    parser.add_argument('--keep-ratios', type=float, nargs='*', default=None,
                        help='keep ratios for the uniform dial (default: the budgets, '
                             'capped at 1)')
    parser.add_argument('--split', choices=['val', 'test'], default='val')
    parser.add_argument('--out-dir', required=True)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    args = parser.parse_args(argv)
    if args.keep_ratios is None:
        args.keep_ratios = sorted({min(b, 1.0) for b in args.budgets})
    bad = [r for r in args.keep_ratios if not 0 < r <= 1]
    if bad:
        parser.error(f'--keep-ratios must be in (0, 1], got {bad}')
    if not args.budgets and not args.keep_ratios:
        parser.error('nothing to sweep: give --budgets and/or --keep-ratios')
    return args


def evaluate(cfg: Any, model: torch.nn.Module, split: str, label: str) -> dict:
    """One pass over the split: the evaluator's metrics and the mean real
    backbone FLOPs / C_base of the routes taken."""
    from mmengine.evaluator import Evaluator
    from mmengine.runner import Runner
    from mmengine.utils import ProgressBar
    backbone = find_dit(model)
    key = f'{split}_dataloader'
    loader = Runner.build_dataloader(dict(cfg[key], num_workers=0, persistent_workers=False))
    evaluator = Evaluator(cfg[f'{split}_evaluator'])
    evaluator.dataset_meta = getattr(loader.dataset, 'metainfo', None)
    spent, images = 0.0, 0
    bar = ProgressBar(len(loader.dataset))
    t0 = time.perf_counter()
    with torch.no_grad():
        for data in loader:
            outputs = model.test_step(data)
            f = backbone.flops(per_image=True)
            spent += float((f['real'] / f['static']).sum())
            images += len(outputs)
            evaluator.process(data_samples=outputs, data_batch=data)
            for _ in outputs:
                bar.update()
    metrics = {k: float(v) for k, v in evaluator.evaluate(len(loader.dataset)).items()}
    print(f'\n  {label}: real {spent / images:.3f} x C_base, '
          + ', '.join(f'{k} {v:.4f}' for k, v in metrics.items() if k in MAIN_METRICS)
          + f' ({time.perf_counter() - t0:.0f} s)', flush=True)
    return dict(real=spent / images, metrics=metrics, images=images)


def main_metric(rows: list[dict]) -> str:
    for name in MAIN_METRICS:
        if all(name in r['metrics'] for r in rows):
            return name
    return sorted(rows[0]['metrics'])[0]


def write_outputs(out_dir: str, rows: list[dict], meta: dict) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    metric = main_metric(rows)
    with open(osp.join(out_dir, 'budget_sweep.json'), 'w') as f:
        json.dump(dict(meta, metric=metric, rows=rows), f, indent=2)
    extra = [m for m in MAIN_METRICS if m != metric and all(m in r['metrics'] for r in rows)]
    lines = [f"Budget sweep of `{meta['checkpoint']}` on the {meta['split']} set "
             f"({rows[0]['images']} images). real = backbone FLOPs of the routes taken / C_base.",
             '', '| dial | setting | real / C_base | ' + ' | '.join([metric] + extra) + ' |',
             '|---|---|---|' + '---|' * (1 + len(extra))]
    for r in rows:
        target = f"{r['setting']:.2f}" + (f" (miss {r['real'] - r['setting']:+.3f})"
                                          if r['dial'] == 'budget' else '')
        lines.append(f"| {r['dial']} | {target} | {r['real']:.3f} | "
                     + ' | '.join(f"{r['metrics'][m]:.4f}" for m in [metric] + extra) + ' |')
    with open(osp.join(out_dir, 'budget_sweep.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for dial, style, name in (('budget', 'o-', 'calibrated dial (budget)'),
                              ('keep_ratio', 's--', 'uniform keep_ratio')):
        pts = sorted((r['real'], r['metrics'][metric]) for r in rows if r['dial'] == dial)
        if pts:
            ax.plot(*zip(*pts), style, label=name)
    ax.set_xlabel('real backbone FLOPs / C_base')
    ax.set_ylabel(metric)
    ax.set_title(osp.basename(meta['config']), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(osp.join(out_dir, 'budget_sweep.png'), dpi=120)
    plt.close(fig)
    print('\n'.join(lines))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    analysis.check_paths(args.config, args.checkpoint)
    cfg, model = analysis.load_model(args.config, args.checkpoint, args.cfg_options,
                                     args.device)
    backbone = find_dit(model)
    if args.budgets and not backbone.dial.has_curve:
        raise SystemExit(f'{args.checkpoint} has no spend curve, so --budgets cannot be '
                         f'dialled; {CALIBRATE_HINT}')
    if args.budgets:
        lo, hi = backbone.dial.spend_range()
        out = [b for b in args.budgets if not lo <= b <= hi]
        if out:
            raise SystemExit(f'--budgets {out} are outside the calibrated range '
                             f'[{lo:.3f}, {hi:.3f}] of {args.checkpoint}')
    plan = [('budget', b) for b in args.budgets] + [('keep_ratio', r) for r in args.keep_ratios]
    rows = []
    for k, (dial, value) in enumerate(plan):
        backbone.budget, backbone.keep_ratio = (value, None) if dial == 'budget' else (None, value)
        print(f'[{k + 1}/{len(plan)}] {dial} = {value}', flush=True)
        res = evaluate(cfg, model, args.split, f'{dial} {value}')
        rows.append(dict(dial=dial, setting=value, **res))
    backbone.budget, backbone.keep_ratio = None, None
    meta = dict(config=args.config, checkpoint=args.checkpoint, split=args.split,
                spend_range=list(backbone.dial.spend_range()) if backbone.dial.has_curve
                else None)
    write_outputs(args.out_dir, rows, meta)
    print(f'written: {args.out_dir}/budget_sweep.{{json,md,png}}')
    return dict(meta, rows=rows)


if __name__ == '__main__':
    main()
