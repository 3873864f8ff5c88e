"""GFLOPs of a DiT detector, segmentor or classifier next to its PVTv2 baseline.

Averages over the first N images of the config's val (or test) set, each at
its own padded input size, or measures one random input of ``--shape``:

    python tools/get_flops.py configs/detection/mask_rcnn_dit_b0_toy.py \\
        --checkpoint work_dirs/x/iter_300.pth --num-images 20 --out flops.json
    python tools/get_flops.py CONFIG --shape 800 1216

Reported per image (GFLOPs = 1e9 multiply-accumulates, the convention of the
PVTv2 / DiT papers and of mmengine's counter):

* backbone ``expected`` (gate probabilities) and ``real`` (hard decisions),
  analytic from the routing of each image; ``static`` = PVTv2 (the same
  backbone with ``routing='static'``) = ``C_base``; ``full`` = whole grid;
  ``static (counted)`` = mmengine's FlopAnalyzer on the static backbone, a
  cross-check of the analytic numbers;
* neck + heads counted by FlopAnalyzer on the routed and on PVTv2's features;
* whole model = backbone (analytic) + neck and heads (counted);
* ratios ``real / C_base``, ``expected / C_base`` next to the budget ``mu``
  of the config's ``BudgetLossHook``.

See :mod:`dit_mm.analysis.flops` for exactly what is counted how.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import os.path as osp
import sys
from pathlib import Path
from typing import Any

try:
    import dit_mm  # noqa: F401
except ImportError:  # running from a checkout without an installed dit_mm
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from dit_mm import analysis


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(
        description='Backbone and whole-model GFLOPs of a DiT model vs. its PVTv2 baseline')
    analysis.add_model_args(parser)
    parser.add_argument('--num-images', type=int, default=20,
                        help='number of data set images to average over (default: 20)')
    parser.add_argument('--split', choices=['val', 'test'], default='val',
                        help='data loader of the config to read images from')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help='measure one random input of this size instead of data set images')
    parser.add_argument('--count-backbone', action='store_true',
                        help='also trace the routed backbone with the FLOP counter (slower)')
    parser.add_argument('--backbone-only', action='store_true',
                        help='skip counting the neck and heads (faster)')
    parser.add_argument('--out', help='write the report as JSON to this file')
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error('--num-images must be >= 1')
    if args.shape is not None and min(args.shape) < 32:
        parser.error('--shape H W must be at least 32 x 32')
    return args


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '-'
    return f'{value:.{digits}f}'


def _row(name: str, *cells: float | str | None) -> str:
    """One table line: a name and four right-aligned cells."""
    widths = (14, 12, 14, 12)
    text = [c if isinstance(c, str) else _fmt(c) for c in cells]
    return f'{name:<24}' + ''.join(f'{t:>{w}}' for t, w in zip(text, widths, strict=True))


def format_report(report: dict[str, Any]) -> str:
    """Human-readable table of a :func:`measure` report."""
    g = report['gflops']
    bb = g['backbone']
    sizes = ', '.join(f'{k} (x{v})' for k, v in report['input_sizes'].items())
    lines = [
        f"config : {report['config']}",
        f"input  : {report['source']}; {report['num_images']} image(s), sizes {sizes}",
        (f"routing: {report['routing']}   checkpoint: "
         f"{report['checkpoint'] or 'none (random init)'}"),
        '',
        _row('GFLOPs / image', 'DiT expected', 'DiT real', 'PVTv2 static', 'full grid'),
        _row('backbone', bb['expected'], bb['real'], bb['static'], bb['full']),
    ]
    if 'whole' in g:
        nh, wh = g['neck_heads'], g['whole']
        lines.append(_row('neck + heads (counted)', nh['routed'], nh['routed'], nh['static'], ''))
        lines.append(_row('whole model', wh['expected'], wh['real'], wh['static'], ''))
    lines.append(_row('backbone (counted)', '', bb.get('real_counted', ''),
                      bb['static_counted'], ''))
    r, mu = report['ratios'], report['mu']
    lines += ['', (f"real/C_base = {_fmt(r['real/C_base'])}   "
                   f"expected/C_base = {_fmt(r['expected/C_base'])}   budget mu = {_fmt(mu)}")]
    if 'whole_real/whole_static' in r:
        lines.append(f"whole model: real/static = {_fmt(r['whole_real/whole_static'])}   "
                     f"expected/static = {_fmt(r['whole_expected/whole_static'])}")
    lines.append('(C_base = PVTv2 backbone, i.e. backbone.routing=static; 1 GFLOP = 1e9 MACs)')
    return '\n'.join(lines)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Builds the model and measures it; returns the JSON report."""
    from mmengine.utils import ProgressBar
    analysis.check_paths(args.config, args.checkpoint)
    cfg, model = analysis.load_model(args.config, args.checkpoint, args.cfg_options,
                                     device=args.device)
    if args.shape is not None:
        batches = [analysis.random_batch(cfg, model, args.shape)]
        total, source = 1, f'random tensor {args.shape[0]}x{args.shape[1]}'
    else:
        total = min(args.num_images, analysis.dataset_size(cfg, args.split))
        batches = analysis.iter_dataset_images(cfg, model, args.split, total)
        source = f'{args.split} set'
    bar = ProgressBar(total, file=sys.stderr) if total > 1 else None
    stats = analysis.routing_stats(model, batches, whole_model=not args.backbone_only,
                                   count_backbone=args.count_backbone,
                                   mu=analysis.budget_mu(cfg),
                                   progress=bar.update if bar else None)
    if bar is not None:
        sys.stderr.write('\n')
    return {'config': args.config, 'checkpoint': args.checkpoint, 'source': source,
            'num_images': stats['num_images'], 'input_sizes': stats['input_sizes'],
            'routing': stats['routing'], 'gflops': stats['gflops'], 'ratios': stats['ratios'],
            'mu': stats['mu'], 'counting': analysis.COUNTING_METHOD}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point; returns the report (also printed, and written with --out)."""
    args = parse_args(argv)
    report = measure(args)
    print(format_report(report))
    if args.out:
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump(report, f, indent=2)
        print(f'report written to {args.out}')
    return report


if __name__ == '__main__':
    main()
