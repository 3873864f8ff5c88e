"""Export a DiT model for deployment, with real skipping.

    python tools/export.py CONFIG [--checkpoint CKPT] --format {onnx,torch-export,aoti}
        [--budget B | --keep-ratio R | --capacity C] [--shape H W] [--batch N]
        [--backbone-only] [--dense] [--cfg-options ...] --out FILE

By default a routed DiT is exported in its static-shape form: every gated
node runs on a fixed number of token slots per image (its capacity), so the
deployed graph costs what the capacity costs. The capacity comes from
``--keep-ratio``, ``--capacity``, or the per-node capacities that
``tools/calibrate_budget.py`` stores in the checkpoint (read at ``--budget``,
or at the checkpoint's calibrated offset). ``--dense`` exports the masked
dense form instead (the whole grid, the same decisions).

The tool checks the exported graph against eager PyTorch on a second random
input and prints the largest difference, the backbone's GFLOPs per image
against ``C_base`` (PVTv2's cost) and the slots per node. See
``docs/deployment.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import dit_mm  # noqa: F401
except ImportError:  # running from a checkout without an installed dit_mm
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_mm import analysis
from dit_mm.analysis.export import FORMATS, export, set_routing
from dit_mm.engine.hooks import find_dit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description='Export a DiT model (ONNX or torch.export) '
                                     'with static-shape routing')
    analysis.add_model_args(parser)
    parser.add_argument('--format', required=True, choices=FORMATS)
    parser.add_argument('--out', required=True,
                        help='output file (.onnx; .pt2 for torch-export and aoti)')
    group = parser.add_mutually_exclusive_group()
    group.add_argument('--budget', type=float,
                       help='budget (x C_base) on the spend curve of a calibrated checkpoint')
    group.add_argument('--keep-ratio', type=float,
                       help='every gated node keeps the top ceil(R * N) tokens of each image')
    group.add_argument('--capacity', type=float,
                       help="slots of every gated node as a fraction of its tokens, filled by "
                            "--slot-policy")
    parser.add_argument('--capacity-scale', type=float,
                        help='multiplies the calibrated capacities (--budget or the checkpoint\'s '
                             'offset): above 1, fewer kept tokens are cut, at a dearer graph')
    parser.add_argument('--slot-policy', choices=['threshold', 'top'],
                        help="which tokens fill the slots (default: the backbone's, 'threshold')")
    parser.add_argument('--shape', type=int, nargs=2, default=[512, 512], metavar=('H', 'W'),
                        help='input size (default: 512 512)')
    parser.add_argument('--batch', type=int, default=1,
                        help='batch of the ONNX graph and of the check (torch-export and aoti '
                             'keep the batch free)')
    parser.add_argument('--backbone-only', action='store_true',
                        help='export model.backbone alone (whole detectors are mmdeploy\'s job)')
    parser.add_argument('--dense', action='store_true',
                        help='export the masked dense form (the whole grid) instead')
    parser.add_argument('--no-count', action='store_true',
                        help='skip counting the graph FLOPs with torch.utils.flop_counter')
    parser.add_argument('--report', help='also write the report as JSON to this file')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    analysis.check_paths(args.config, args.checkpoint)
    _, model = analysis.load_model(args.config, args.checkpoint, args.cfg_options, args.device)
    backbone = find_dit(model)
    try:
        if args.capacity_scale is not None:
            backbone.capacity_scale = args.capacity_scale
        set_routing(backbone, budget=args.budget, keep_ratio=args.keep_ratio,
                    capacity=args.capacity, slot_policy=args.slot_policy, dense=args.dense)
        report = export(model, args.format, args.out, shape=tuple(args.shape),
                        batch=args.batch, backbone_only=args.backbone_only,
                        count=not args.no_count)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f'export: {e}') from None
    for line in report.lines():
        print(line)
    out = dict(vars(report), config=args.config, checkpoint=args.checkpoint,
               shape=list(args.shape), batch=args.batch, backbone_only=args.backbone_only)
    if args.report:
        Path(args.report).write_text(json.dumps(out, indent=2) + '\n')
    return out


if __name__ == '__main__':
    main()
