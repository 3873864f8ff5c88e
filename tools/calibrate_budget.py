"""Calibrate a trained DiT to spend a budget at inference, and store its spend curve.

    python tools/calibrate_budget.py CONFIG CHECKPOINT --mu 0.75 \\
        [--num-images N] [--split train|val] [--tol 0.01] --out CALIBRATED.pth

Finds one logit offset that is added to the keep logit of every learned gate
(row and column) so that the mean real backbone FLOPs / C_base over N images
of the config's data (test pipeline, eval mode, one image at a time) is
within ``--tol`` (relative, default 1 %) of ``--mu``, by bisection. It also
measures the spend curve (offset -> spend) from every gate closed to every
gate open. The output is the input checkpoint with both as buffers of the
backbone (``backbone.dial.offset``, ``backbone.dial.curve``) and a
``meta['dit_calibration']`` record:

* loading it as usual runs the calibrated model (spends ``mu``);
* ``model.backbone.budget = B``, ``budget=B`` in the backbone config or
  ``tools/test.py ... --budget B`` read any budget in the curve's range off
  the curve, without recalibrating.

The spend is measured at the images' own test-pipeline sizes; calibrate on
data like the data you will run (``--split train`` reads the training images
through the test pipeline).
"""
from __future__ import annotations

import argparse
import json
import os.path as osp
import sys
import time
from pathlib import Path

try:
    import dit_mm  # noqa: F401
except ImportError:  # running from a checkout without an installed dit_mm
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from dit_mm import analysis
from dit_mm.analysis.calibration import apply_calibration, calibrate, collect_inputs
from dit_mm.engine.hooks import find_dit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='mmdet / mmseg / mmpretrain config of the model')
    parser.add_argument('checkpoint', help='trained checkpoint (mmengine) of the whole model')
    parser.add_argument('--mu', type=float, required=True,
                        help='budget to spend, as a fraction of C_base (PVTv2 = 1.0)')
    parser.add_argument('--num-images', type=int, default=None,
                        help='images to calibrate on (default: the whole split)')
    parser.add_argument('--split', choices=['train', 'val', 'test'], default='train',
                        help='data to calibrate on (train: the training images through the '
                             'test pipeline; default)')
    parser.add_argument('--tol', type=float, default=0.01,
                        help='relative tolerance on mu (default 0.01)')
    parser.add_argument('--out', required=True, help='calibrated checkpoint to write')
    parser.add_argument('--report', help='also write the calibration record as JSON here')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    args = parser.parse_args(argv)
    if args.num_images is not None and args.num_images <= 0:
        parser.error('--num-images must be positive')
    if not 0 < args.tol < 0.5:
        parser.error('--tol must be in (0, 0.5)')
    if osp.abspath(args.out) == osp.abspath(args.checkpoint):
        parser.error('--out must differ from the input checkpoint (it is kept as it is)')
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    analysis.check_paths(args.config, args.checkpoint)
    cfg, model = analysis.load_model(args.config, args.checkpoint, args.cfg_options,
                                     args.device)
    backbone = find_dit(model)
    if backbone.budget is not None:  # calibrate the model as trained
        backbone.budget = None
    t0 = time.perf_counter()
    inputs = collect_inputs(cfg, model, args.split, args.num_images)
    print(f'calibrating to mu={args.mu} on {len(inputs)} {args.split} images '
          f'(read in {time.perf_counter() - t0:.1f} s)', flush=True)
    cal = calibrate(model, inputs, args.mu, tol=args.tol,
                    progress=lambda line: print(line, flush=True))
    apply_calibration(model, cal)
    lo, hi = cal.spend_range()
    record = dict(mu=cal.mu, offset=cal.offset, spend=cal.spend, spend_before=cal.spend_before,
                  split=args.split, num_images=len(inputs), tol=args.tol,
                  spend_range=[lo, hi], curve_points=len(cal.points),
                  config=args.config, source_checkpoint=args.checkpoint)
    ckpt = torch.load(args.checkpoint, map_location='cpu', weights_only=False)
    state = ckpt.get('state_dict', ckpt)
    prefix = next((k[:-len('dial.offset')] for k in model.state_dict()
                   if k.endswith('dial.offset')), 'backbone.')
    for name, value in backbone.dial.state_dict().items():
        state[f'{prefix}dial.{name}'] = value.detach().cpu().clone()
    if isinstance(ckpt.get('meta'), dict):
        ckpt['meta']['dit_calibration'] = record
    elif 'state_dict' in ckpt:
        ckpt['meta'] = dict(dit_calibration=record)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, args.out)
    print(f'\nspend on the {len(inputs)} {args.split} images (x C_base): before '
          f'{cal.spend_before:.4f}, after {cal.spend:.4f} (mu {cal.mu}, offset {cal.offset:+.4f})')
    print(f'spend curve: {len(cal.points)} points, budgets {lo:.3f} .. {hi:.3f} can be dialled '
          f'(model.backbone.budget = B, or tools/test.py ... --budget B)')
    if backbone.dial.has_capacities:
        caps = backbone.dial.keep_at(cal.offset)
        record['capacities'] = {f's{i}_t{j}': round(c, 4)
                                for (i, j), c in zip(backbone.spec.nodes, caps)}
        print('static-shape capacities at mu (kept fraction per node, stored for every point '
              'of the curve; tools/export.py, tools/test.py --static-shapes): '
              + ', '.join(f'{k} {v:.3f}' for k, v in record['capacities'].items()))
    print(f'written: {args.out} ({cal.seconds:.0f} s)')
    if args.report:
        with open(args.report, 'w') as f:
            json.dump(dict(record, points=cal.points), f, indent=2)
    return dict(record, points=cal.points)


if __name__ == '__main__':
    main()
