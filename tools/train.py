"""Train a DiT detector, segmentor or classifier (mmdet, mmseg or mmpretrain config).

A thin wrapper over mmengine's Runner, like mmdet's own ``tools/train.py``:

    python tools/train.py configs/detection/mask_rcnn_dit_b2_3x.py
    python tools/train.py CONFIG --work-dir work_dirs/x --amp --resume
    bash tools/dist_train.sh CONFIG 2        # torchrun, also on CPU (gloo)

Training on the CPU keeps freed memory for reuse
(:func:`dit_mm.engine.runtime.keep_freed_memory`; ``--no-keep-freed-memory``
turns it off). A training step reaches the same peak every iteration, so the
heap it keeps costs nothing in steady state, while glibc's default hands the
activations back to the kernel and page-faults them in again at every step:
DiT-b2's full-grid step at 512x512, batch 2, took 1.4x as long that way
(``benchmarks/bench_train.py``; ``docs/benchmarks.md``, "Training time (CPU)";
``docs/design.md``, "Timing on this machine: the allocator").
"""
import argparse
import os
import os.path as osp

import torch
from mmengine.config import Config, DictAction
from mmengine.logging import print_log
from mmengine.runner import Runner

from dit_mm.engine.runtime import (
    allow_mmengine_checkpoints,
    enable_amp,
    keep_freed_memory,
    setup_distributed,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a DiT detector, segmentor or classifier')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument('--amp', action='store_true',
                        help='mixed precision (CUDA: fp16 AMP; CPU: bf16 autocast)')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from this checkpoint, or from the latest one in '
                        'the work dir when no path is given')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value (xxx=yyy format)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--keep-freed-memory', action=argparse.BooleanOptionalAction,
                        default=None, help="keep freed memory for reuse instead of returning "
                        "it to the kernel (glibc); default: on when training on the CPU")
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def build_config(args: argparse.Namespace) -> Config:
    if not osp.isfile(args.config):
        raise SystemExit(f'config file not found: {args.config}')
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    if args.amp:
        enable_amp(cfg)
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise SystemExit(f'--resume: checkpoint not found: {args.resume}')
        cfg.resume = True
        cfg.load_from = args.resume
    setup_distributed(cfg, args.launcher)
    return cfg


def keeps_freed_memory(args: argparse.Namespace) -> bool:
    """``--[no-]keep-freed-memory``, or on when training on the CPU."""
    if args.keep_freed_memory is None:
        return not torch.cuda.is_available()
    return args.keep_freed_memory


def main(argv=None) -> None:
    args = parse_args(argv)
    allow_mmengine_checkpoints()
    if keeps_freed_memory(args) and not keep_freed_memory():  # before the model's first allocation
        print_log('--keep-freed-memory: not glibc, ignored', logger='current', level=30)
    cfg = build_config(args)
    runner = Runner.from_cfg(cfg)
    runner.train()


if __name__ == '__main__':
    main()
