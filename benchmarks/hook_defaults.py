"""The budget hook with only ``mu``: spend and accuracy before and after its
new defaults, over seeds, on the toy classification set and the main job's
detector.

    python benchmarks/hook_defaults.py [--tasks classification detection]
        [--seeds 0 1 2] [--variants before after] [--skip-done] [--out FILE]

Each run trains a toy config with its budget hook replaced by the minimal one
a user writes, ``dict(type='BudgetLossHook', mu=MU, loss_weight=1.0)``:

* ``before``: the hook's old defaults spelled out (Gumbel temperature 1.0 for
  the whole run, no calibration at the end);
* ``after``: the new defaults (temperature annealed to 0.2 over the run, the
  gates calibrated to ``mu`` on 64 training images at the end).

It records the training decisions' spend (the last logged ``flops_real``),
the spend at inference on the val images (``tools/get_flops.py``), and top-1
or bbox/segm mAP (``tools/test.py``). The machine goes into the JSON
(``benchmarks/results/hook-defaults-toy-<cpu>-torch<version>.json``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))

from ablations import _options, _py, prepare_data  # noqa: E402
from machine import machine, write_result  # noqa: E402

CONFIGS = {'classification': 'configs/classification/dit_b0_toy.py',
           'detection': 'configs/detection/mask_rcnn_dit_b0_toy.py'}
MU = {'classification': 0.95, 'detection': 1.0}
HOOKS = {'before': dict(tau_end=1.0, tau_anneal_iters=0, calibrate_at_end=False),
         'after': dict()}


def _config(task: str, variant: str, seed: int, wd: Path) -> Path:
    """A config inheriting the toy one, with the minimal hook."""
    hook = dict(type='BudgetLossHook', mu=MU[task], loss_weight=1.0, **HOOKS[variant])
    path = wd / 'config.py'
    path.write_text(f"_base_ = '{ROOT / CONFIGS[task]}'\n"
                    f'custom_hooks = [{hook!r}, '
                    f"dict(type='IterSeedHook', seed={seed})]\n"
                    f'randomness = dict(seed={seed})\n')
    return path


def _last_logged(wd: Path, key: str) -> Optional[float]:
    scalars = sorted(wd.glob('*/vis_data/scalars.json'))
    if not scalars:
        return None
    rows = [json.loads(line) for line in scalars[-1].read_text().splitlines()]
    vals = [r[key] for r in rows if key in r]
    return vals[-1] if vals else None


def run_one(task: str, variant: str, seed: int, work_dir: Path, data: Dict[str, str],
            flops_images: int) -> Dict[str, Any]:
    wd = work_dir / f'{task}_{variant}_s{seed}'
    wd.mkdir(parents=True, exist_ok=True)
    log = wd / 'run.log'
    log.write_text('')
    cfg = str(_config(task, variant, seed, wd))
    if task == 'classification':
        opts = {f'{k}.dataset.data_root': data['cls']
                for k in ('train_dataloader', 'val_dataloader', 'test_dataloader')}
    else:
        coco = data['det'] + '/coco/'
        opts = {f'{k}.dataset.data_root': coco
                for k in ('train_dataloader', 'val_dataloader', 'test_dataloader')}
        opts.update({'val_evaluator.ann_file': coco + 'annotations/instances_val.json',
                     'test_evaluator.ann_file': coco + 'annotations/instances_val.json'})
    t0 = time.perf_counter()
    _py('tools/train.py', cfg, '--work-dir', str(wd), '--cfg-options',
        *_options({**opts, 'train_cfg.val_interval': 10 ** 9}), log=log)
    train_s = time.perf_counter() - t0
    ckpt = (wd / 'last_checkpoint').read_text().strip()
    _py('tools/test.py', cfg, ckpt, '--work-dir', str(wd / 'test'), '--metrics-json',
        str(wd / 'metrics.json'), '--cfg-options', *_options(opts), log=log)
    _py('tools/get_flops.py', cfg, '--checkpoint', ckpt, '--num-images', str(flops_images),
        '--backbone-only', '--out', str(wd / 'flops.json'), '--cfg-options', *_options(opts),
        log=log)
    metrics = json.loads((wd / 'metrics.json').read_text())
    flops = json.loads((wd / 'flops.json').read_text())
    keys = ['accuracy/top1'] if task == 'classification' else ['coco/bbox_mAP', 'coco/segm_mAP']
    return dict(task=task, variant=variant, seed=seed, mu=MU[task], hook=HOOKS[variant],
                train_spend=_last_logged(wd, 'flops_real'),
                inference_spend=flops['ratios']['real/C_base'],
                flops_images=flops['num_images'], metrics={k: metrics[k] for k in keys},
                train_seconds=round(train_s, 1))


def summary(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for r in runs:
        row = out.setdefault(r['task'], {}).setdefault(r['variant'], {})
        for k, v in [('train_spend', r['train_spend']), ('inference_spend', r['inference_spend']),
                     *r['metrics'].items()]:
            row.setdefault(k, []).append(v)
    for task in out.values():
        for row in task.values():
            for k, v in list(row.items()):
                v = [x for x in v if x is not None]
                row[k] = dict(values=v, mean=statistics.mean(v) if v else None,
                              std=statistics.stdev(v) if len(v) > 1 else None)
    return out


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--tasks', nargs='+', choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument('--variants', nargs='+', choices=list(HOOKS), default=list(HOOKS))
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--flops-images', type=int, default=200)
    p.add_argument('--work-dir', default='work_dirs/hook_defaults')
    p.add_argument('--skip-done', action='store_true', help='keep runs already in --out')
    p.add_argument('--out', help='default: benchmarks/results/hook-defaults-toy-<machine>.json')
    args = p.parse_args(argv)
    import torch
    name = f'hook-defaults-toy-cpu-torch{torch.__version__.split("+")[0]}.json'
    out = Path(args.out or ROOT / 'benchmarks' / 'results' / name)
    runs = json.loads(out.read_text())['runs'] if args.skip_done and out.is_file() else []
    done = {(r['task'], r['variant'], r['seed']) for r in runs}
    data = prepare_data(argparse.Namespace(quick=False, work_dir=args.work_dir))
    for task in args.tasks:
        for seed in args.seeds:
            for variant in args.variants:
                if (task, variant, seed) in done:
                    continue
                print(f'[hook_defaults] {task} {variant} seed {seed}', flush=True)
                runs.append(run_one(task, variant, seed, Path(args.work_dir), data,
                                    args.flops_images))
                print(json.dumps(runs[-1]), flush=True)
                res = dict(benchmark='hook-defaults-toy', machine=machine(), runs=runs,
                           summary=summary(runs))
                write_result(res, str(out), name)
    return dict(runs=runs, summary=summary(runs))


if __name__ == '__main__':
    main()
