"""Evaluate a DiT detector, segmentor or classifier (mmdet, mmseg or mmpretrain config).

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--metrics-json FILE]
                         [--budget B | --keep-ratio R]
    bash tools/dist_test.sh CONFIG CHECKPOINT 2
"""
import argparse
import json
import os
import os.path as osp

from mmengine.config import Config, DictAction
from mmengine.logging import print_log
from mmengine.runner import Runner

from dit_mm.engine.hooks import find_dit
from dit_mm.engine.runtime import allow_mmengine_checkpoints, keep_freed_memory, setup_distributed


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test a DiT detector, segmentor or classifier')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save logs and results')
    parser.add_argument('--metrics-json', help='also write the metrics to this JSON file')
    parser.add_argument('--keep-ratio', type=float, default=None,
                        help="override the backbone's keep_ratio at inference")
    parser.add_argument('--budget', type=float, default=None,
                        help='inference budget (x C_base) read off the spend curve of a '
                             'checkpoint calibrated by tools/calibrate_budget.py')
    parser.add_argument('--keep-freed-memory', action='store_true',
                        help='keep freed memory for reuse instead of page-faulting it back '
                             'in every forward (glibc; faster CPU inference, the process '
                             'keeps its peak heap)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value (xxx=yyy format)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if args.budget is not None and args.keep_ratio is not None:
        parser.error('give --budget or --keep-ratio, not both (a keep ratio overrides the '
                     'row gates that the budget dials)')
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    allow_mmengine_checkpoints()
    for path in (args.config, args.checkpoint):
        if not osp.isfile(path):
            raise SystemExit(f'file not found: {path}')
    if args.keep_freed_memory and not keep_freed_memory():
        print_log('--keep-freed-memory: not glibc, ignored', logger='current', level=30)
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.keep_ratio is not None:
        cfg.model.backbone.keep_ratio = args.keep_ratio
    cfg.model.backbone.init_cfg = None  # weights come from the checkpoint
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or osp.join(
        './work_dirs', osp.splitext(osp.basename(args.config))[0])
    cfg.load_from = args.checkpoint
    setup_distributed(cfg, args.launcher)
    runner = Runner.from_cfg(cfg)
    if args.budget is not None:
        # load now, so that a budget outside the stored curve fails before testing
        runner.load_or_resume()
        backbone = find_dit(runner.model)
        try:
            backbone.budget = args.budget
            backbone.gate_offset()
        except (RuntimeError, ValueError) as e:
            raise SystemExit(f'--budget {args.budget}: {e}') from None
        print_log(f'--budget {args.budget}: gate offset {backbone.gate_offset():+.4f} from the '
                  f'spend curve of {args.checkpoint}', logger='current')
    metrics = runner.test()
    if args.metrics_json and runner.rank == 0:
        with open(args.metrics_json, 'w') as f:
            json.dump({k: float(v) for k, v in metrics.items()}, f, indent=2)
    return metrics


if __name__ == '__main__':
    main()
