"""Small-scale replica of the paper's ablations (Tables 6-8) and a Table 3 proxy.

    python benchmarks/ablations.py                      # the whole study (~2 h, 2 cores)
    python benchmarks/ablations.py --variants dynamic static --seeds 3 4
    python benchmarks/ablations.py --report-only        # table + plot from the JSON
    python benchmarks/ablations.py --quick              # smoke test (tiny data, few iters)

Every run trains from scratch with one recipe through ``tools/train.py``,
evaluates through ``tools/test.py`` and measures the real backbone FLOPs at
inference on the validation images through ``tools/get_flops.py``, each in its
own process. Variants (one seed = one run):

* classification (``configs/classification/dit_b0_toy.py``, DiT-b0 on the
  toy classification set, top-1):
  ``static`` (PVTv2), ``full`` (every node and token) and ``dynamic``
  (learned gates) -- Table 6; ``random`` and ``attention`` row gates --
  Table 7; ``scale_only`` (column gates, every token) and ``depth_only``
  (token gates on PVTv2's topology) -- Table 8; ``sparse_training`` (learned
  gates trained on the packed path). Gated variants train with the budget
  hook at ``mu = 0.95``.
* detection (``configs/detection/mask_rcnn_dit_b0_toy.py``, the main job's
  DiT-b0 Mask R-CNN, bbox and segm mAP): ``static`` against ``dynamic`` at
  ``mu = 1`` -- a proxy of Table 3.

Each finished run is merged into ``--out`` (default
``benchmarks/ablations.json``) at once, so an interrupted study keeps what it
finished and later calls with ``--variants`` / ``--seeds`` add to it (a run of
the same task, variant and seed is replaced). The markdown table
(``ablations.md``) and the plot (``ablations.png``, metric against real
FLOPs, mean +- std over seeds) are rewritten from the merged JSON after every
run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLS_CONFIG = 'configs/classification/dit_b0_toy.py'
DET_CONFIG = 'configs/detection/mask_rcnn_dit_b0_toy.py'
CLS_MU, DET_MU = 0.95, 1.0

# variant -> backbone overrides (beyond the config's routing='dynamic', gate='learned')
CLS_VARIANTS: Dict[str, Dict[str, Any]] = {
    'static': dict(routing='static'),
    'full': dict(routing='full'),
    'dynamic': dict(),
    'random': dict(gate='random'),  # random_keep_prob set to spend mu (random_keep_prob())
    'attention': dict(gate='attention'),
    'scale_only': dict(depth_routing=False),
    'depth_only': dict(scale_routing=False),
    'sparse_training': dict(sparse_training=True),
}
DET_VARIANTS: Dict[str, Dict[str, Any]] = {'static': dict(routing='static'), 'dynamic': dict()}
TABLE = {'static': 'Table 6', 'full': 'Table 6', 'dynamic': 'Table 6', 'random': 'Table 7',
         'attention': 'Table 7', 'scale_only': 'Table 8', 'depth_only': 'Table 8',
         'sparse_training': '(ours)'}
METRICS = {'classification': ('accuracy/top1', ),
           'detection': ('coco/bbox_mAP', 'coco/segm_mAP')}
# the paper's rows (DiT-B2 on ImageNet-1k: GFLOPs, top-1 %)
PAPER = {'static': '? G, 80.7 (Table 6); PVTv2-B2: 4.0 G, 82.0', 'full': '15.6 G (4.1x), 83.5',
         'dynamic': '3.8 G, 83.1', 'random': '3.8 G, 79.4', 'attention': '3.8 G, 81.3',
         'scale_only': '8.4 G, 82.9', 'depth_only': '3.7 G, 82.2', 'sparse_training': '-'}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--tasks', nargs='+', choices=['classification', 'detection'],
                        default=['classification', 'detection'])
    parser.add_argument('--variants', nargs='+', help='variants to run (default: all of the '
                        f'task): {", ".join(CLS_VARIANTS)}')
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--cls-iters', type=int, default=None,
                        help='classification iterations (default: the config\'s)')
    parser.add_argument('--det-iters', type=int, default=None,
                        help='detection iterations (default: the config\'s)')
    parser.add_argument('--flops-images', type=int, default=200,
                        help='val images over which real FLOPs are averaged (default 200)')
    parser.add_argument('--work-dir', default='work_dirs/ablations')
    parser.add_argument('--out', default='benchmarks/ablations.json')
    parser.add_argument('--skip-done', action='store_true',
                        help='skip (task, variant, seed) runs already in --out (continue an '
                        'interrupted study)')
    parser.add_argument('--report-only', action='store_true',
                        help='only rewrite the table and plot from --out')
    parser.add_argument('--analyse', action='store_true',
                        help='after the runs (or alone, with --report-only): accuracy per '
                        'object size of every classification checkpoint, learning curves')
    parser.add_argument('--analyse-seeds', nargs='+', type=int,
                        help='--analyse only the runs of these seeds (default: all)')
    parser.add_argument('--quick', action='store_true',
                        help='smoke test: tiny generated data, 4 iterations, one seed')
    args = parser.parse_args(argv)
    known = set(CLS_VARIANTS) | set(DET_VARIANTS)
    bad = [v for v in args.variants or [] if v not in known]
    if bad:
        parser.error(f'unknown variants {bad}; choose from {sorted(known)}')
    return args


# ------------------------------------------------------------------ running
def random_keep_prob(mu: float, arch: str = 'b0', size: Sequence[int] = (96, 96)) -> float:
    """Keep probability of ``gate='random'`` row gates at which DiT with
    every column edge open spends ``mu`` at ``size`` (the cost model): the
    random gates start at the budget and the learned column gates hold it."""
    from dit_mm.models.cost_model import grid_cost, uniform_keep_for_budget
    from dit_mm.models.grid import resolve_arch
    cost = grid_cost(resolve_arch(arch), int(size[0]), int(size[1]))
    return round(uniform_keep_for_budget(cost, mu), 4)


def _py(script: str, *args: str, log: Path) -> None:
    cmd = [sys.executable, str(ROOT / script), *args]
    with open(log, 'a') as fh:
        fh.write(f'\n$ {" ".join(cmd)}\n')
        fh.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f'{script} failed (exit {proc.returncode}); see {log}')


def _options(overrides: Dict[str, Any]) -> List[str]:
    out = []
    for k, v in overrides.items():
        out.append(f'{k}={v!r}' if isinstance(v, str) else f'{k}={v}')
    return out


def step_time(work_dir: Path, skip: int = 10) -> Optional[float]:
    """Mean logged ``time`` per training iteration after the first ``skip``
    iterations (all of them when there are no more), from mmengine's
    ``vis_data/scalars.json``."""
    files = sorted(work_dir.glob('*/vis_data/scalars.json'))
    if not files:
        return None
    logged = [json.loads(line) for line in files[-1].read_text().splitlines()]
    logged = [r for r in logged if 'time' in r and 'loss' in r and 'step' in r]
    times = [float(r['time']) for r in logged if r['step'] > skip] or [
        float(r['time']) for r in logged]
    return sum(times) / len(times) if times else None


def run_one(task: str, variant: str, seed: int, args: argparse.Namespace,
            data: Dict[str, str]) -> Dict[str, Any]:
    """Trains, tests and measures one (task, variant, seed); returns its record."""
    cfg = CLS_CONFIG if task == 'classification' else DET_CONFIG
    mu = CLS_MU if task == 'classification' else DET_MU
    backbone = dict((CLS_VARIANTS if task == 'classification' else DET_VARIANTS)[variant])
    if backbone.get('gate') == 'random':
        backbone['random_keep_prob'] = random_keep_prob(mu)
    wd = Path(args.work_dir) / f'{task}_{variant}_s{seed}'
    wd.mkdir(parents=True, exist_ok=True)
    log = wd / 'run.log'
    log.write_text('')
    iters = args.cls_iters if task == 'classification' else args.det_iters
    opts: Dict[str, Any] = {f'model.backbone.{k}': v for k, v in backbone.items()}
    opts.update({'randomness.seed': seed, 'custom_hooks.0.mu': mu, 'custom_hooks.0.seed': seed,
                 'custom_hooks.1.seed': seed})
    if task == 'classification':
        opts.update({'train_dataloader.dataset.data_root': data['cls'],
                     'val_dataloader.dataset.data_root': data['cls'],
                     'test_dataloader.dataset.data_root': data['cls']})
    else:
        coco = data['det'] + '/coco/'
        opts.update({'train_dataloader.dataset.data_root': coco,
                     'val_dataloader.dataset.data_root': coco,
                     'test_dataloader.dataset.data_root': coco,
                     'val_evaluator.ann_file': coco + 'annotations/instances_val.json',
                     'test_evaluator.ann_file': coco + 'annotations/instances_val.json'})
    train_opts = dict(opts)
    if iters is not None:
        warm = min(30, max(1, iters // 4))  # both toy configs warm up for 30 iterations
        train_opts.update({'train_cfg.max_iters': iters, 'param_scheduler.1.end': iters,
                           'param_scheduler.0.end': warm, 'param_scheduler.1.begin': warm,
                           'custom_hooks.0.tau_anneal_iters': iters,
                           'default_hooks.checkpoint.interval': iters})
    train_opts['train_cfg.val_interval'] = 10 ** 9  # tested below, by tools/test.py
    # the replica's protocol: each variant's spend as trained, next to its accuracy
    # (BudgetLossHook would otherwise calibrate every gated run to mu at the end)
    train_opts['custom_hooks.0.calibrate_at_end'] = False
    if args.quick:
        train_opts['default_hooks.logger.interval'] = 1
    start = time.perf_counter()
    _py('tools/train.py', cfg, '--work-dir', str(wd), '--cfg-options', *_options(train_opts),
        log=log)
    train_s = time.perf_counter() - start
    ckpt = (wd / 'last_checkpoint').read_text().strip()
    metrics_file = wd / 'metrics.json'
    _py('tools/test.py', cfg, ckpt, '--work-dir', str(wd / 'test'), '--metrics-json',
        str(metrics_file), '--cfg-options', *_options(opts), log=log)
    flops_file = wd / 'flops.json'
    _py('tools/get_flops.py', cfg, '--checkpoint', ckpt, '--num-images', str(args.flops_images),
        '--backbone-only', '--out', str(flops_file), '--cfg-options', *_options(opts), log=log)
    metrics = json.loads(metrics_file.read_text())
    flops = json.loads(flops_file.read_text())
    rec: Dict[str, Any] = {
        'task': task, 'variant': variant, 'seed': seed, 'mu': mu if backbone.get(
            'routing') not in ('static', 'full') else None,
        'backbone': backbone,
        'real_flops_ratio': flops['ratios']['real/C_base'],
        'expected_flops_ratio': flops['ratios']['expected/C_base'],
        'flops_images': flops['num_images'],
        'step_time_s': step_time(wd), 'train_wall_s': round(train_s, 1),
        'iters': iters, 'checkpoint': ckpt}
    for key in METRICS[task]:
        value = float(metrics[key])
        rec[key] = value
    rec['metric'] = float(metrics[METRICS[task][0]])
    return rec


# ----------------------------------------------------------------- analysis
SIZE_BINS = (6, 12, 24, 48, 90)  # object extent bins (px) of the toy classification set


def accuracy_by_size(run: Dict[str, Any], data_root: str) -> Dict[str, Any]:
    """Top-1 of a classification run's checkpoint per object-extent bin on
    the val images (the extents are in ``meta/val.json``), and the mean kept
    fraction of the stride-4 nodes per bin (how much high-resolution compute
    small and large objects get)."""
    import torch

    from dit_mm import analysis
    opts = {'val_dataloader.dataset.data_root': data_root,
            'test_dataloader.dataset.data_root': data_root,
            **{f'model.backbone.{k}': v for k, v in run['backbone'].items()}}
    cfg, model = analysis.load_model(CLS_CONFIG, run['checkpoint'], opts)
    sizes = {m['file']: m['size'] for m in json.loads(
        (Path(data_root) / 'meta' / 'val.json').read_text())}
    hits: Dict[int, List[int]] = {k: [] for k in range(len(SIZE_BINS) - 1)}
    keep4: Dict[int, List[float]] = {k: [] for k in range(len(SIZE_BINS) - 1)}
    with torch.no_grad():
        for batch in analysis.iter_dataset_images(cfg, model, 'val'):
            (sample, ) = model(batch['inputs'], batch['data_samples'], mode='predict')
            rel = '/'.join(Path(sample.img_path).parts[-2:])
            size = sizes[rel]
            b = max(k for k in range(len(SIZE_BINS) - 1) if size >= SIZE_BINS[k] or k == 0)
            hits[b].append(int(sample.pred_label.item() == sample.gt_label.item()))
            rows = model.backbone.last_record.rows
            fine = [float(r[0]) for (i, _), (_, r) in rows.items() if i == 0]
            keep4[b].append(sum(fine) / len(fine) if fine else 1.0)
    return {f'{SIZE_BINS[k]}-{SIZE_BINS[k + 1]}px': {
        'n': len(v), 'top1': 100.0 * sum(v) / len(v) if v else math.nan,
        'keep_stride4': sum(keep4[k]) / len(keep4[k]) if keep4[k] else math.nan}
        for k, v in hits.items()}


def curves(run: Dict[str, Any]) -> Dict[str, List[float]]:
    """Logged training curves of a run (``iter``, ``loss``, ``flops_real``,
    ``keep_s0..3`` where logged), from mmengine's ``scalars.json``."""
    files = sorted(Path(run['checkpoint']).parent.glob('*/vis_data/scalars.json'))
    logged = [json.loads(line) for line in files[-1].read_text().splitlines()] if files else []
    logged = [r for r in logged if 'loss' in r]
    keys = ['iter', 'loss', 'flops_real', 'keep_s0', 'keep_s1', 'keep_s2', 'keep_s3']
    return {k: [r.get(k, math.nan) for r in logged] for k in keys}


def analyse(path: Path, data_root: str, seeds: Optional[Sequence[int]] = None) -> None:
    """Adds ``top1_by_size`` to every classification run of ``path`` (of
    ``seeds``, default all) that lacks it, and writes the learning curves
    (``*_curves.png``)."""
    data = json.loads(path.read_text())
    for r in data['runs']:
        if r['task'] == 'classification' and 'top1_by_size' not in r and (
                seeds is None or r['seed'] in seeds):
            print(f"analysing {r['variant']} seed {r['seed']} ...", flush=True)
            r['top1_by_size'] = accuracy_by_size(r, data_root)
            path.write_text(json.dumps(data, indent=1))
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    cls = [r for r in data['runs'] if r['task'] == 'classification']
    variants = [v for v in CLS_VARIANTS if any(r['variant'] == v for r in cls)]
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.6))
    for k, v in enumerate(variants):
        for n, r in enumerate(x for x in cls if x['variant'] == v):
            c = curves(r)
            kw = dict(color=f'C{k}', alpha=0.8, label=v if n == 0 else None)
            axes[0].plot(c['iter'], c['loss'], **kw)
            axes[1].plot(c['iter'], c['flops_real'], **kw)
            axes[2].plot(c['iter'], c['keep_s0'], **kw)
    for ax, name in zip(axes, ('training loss', 'flops_real / C_base (training decisions)',
                                'kept fraction, stride-4 nodes (training)')):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel('iteration')
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path.with_name(path.stem + '_curves.png'), dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------ results
def load_runs(path: Path) -> List[Dict[str, Any]]:
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return data['runs'] if isinstance(data, dict) else data


def merge(path: Path, rec: Dict[str, Any], meta: Dict[str, Any]) -> List[Dict[str, Any]]:
    runs = [r for r in load_runs(path) if (r['task'], r['variant'], r['seed']) !=
            (rec['task'], rec['variant'], rec['seed'])]
    runs.append(rec)
    runs.sort(key=lambda r: (r['task'], list(CLS_VARIANTS).index(r['variant']), r['seed']))
    path.write_text(json.dumps({'meta': meta, 'runs': runs}, indent=1))
    return runs


def _mean_std(vals: Sequence[float]) -> tuple:
    vals = [v for v in vals if v is not None]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd


def aggregate(runs: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Mean and sample std over seeds per (task, variant)."""
    rows = []
    keys = []
    for r in runs:
        if (r['task'], r['variant']) not in keys:
            keys.append((r['task'], r['variant']))
    for task, variant in keys:
        rs = [r for r in runs if r['task'] == task and r['variant'] == variant]
        row = {'task': task, 'variant': variant, 'seeds': sorted(r['seed'] for r in rs)}
        for key in ('metric', 'real_flops_ratio') + METRICS[task][1:]:
            row[key] = _mean_std([r.get(key) for r in rs])
        # the fastest seed: runs are sequential, so a busy neighbour slows
        # some of them; the minimum is the least disturbed measurement
        steps = [r['step_time_s'] for r in rs if r.get('step_time_s')]
        row['step_time_s'] = min(steps) if steps else math.nan
        rows.append(row)
    return rows


def markdown(runs: Sequence[Dict[str, Any]]) -> str:
    rows = aggregate(runs)
    lines = ['Generated by `python benchmarks/ablations.py` (mean ± sample std over seeds; '
             'real FLOPs = backbone FLOPs of the routes taken at inference on the val images, '
             'as a fraction of PVTv2-b0\'s, C_base).', '']
    cls = [r for r in rows if r['task'] == 'classification']
    if cls:
        lines += ['**Classification** (DiT-b0, toy classification set, 96², top-1 %; '
                  f'gated variants trained at μ = {CLS_MU})', '',
                  '| table | variant | seeds | top-1 (%) | real FLOPs / C_base | '
                  'train step (s, fastest seed) | paper (ImageNet, B2: GFLOPs, top-1) |',
                  '|---|---|---|---|---|---|---|']
        for r in cls:
            lines.append(
                f"| {TABLE[r['variant']]} | {r['variant']} | {len(r['seeds'])} | "
                f"{r['metric'][0]:.1f} ± {r['metric'][1]:.1f} | "
                f"{r['real_flops_ratio'][0]:.3f} ± {r['real_flops_ratio'][1]:.3f} | "
                f"{r['step_time_s']:.3f} | {PAPER[r['variant']]} |")
        lines.append('')
    sized = [r for r in runs if r['task'] == 'classification' and 'top1_by_size' in r]
    if sized:
        bins = list(sized[0]['top1_by_size'])
        seeds = sorted({r['seed'] for r in sized})
        lines += [f'Top-1 (%) by object extent on the val images (mean over seeds {seeds}), '
                  'and in brackets the mean kept fraction of the stride-4 nodes '
                  '(`python benchmarks/ablations.py --report-only --analyse`):', '',
                  '| variant | ' + ' | '.join(bins) + ' |', '|---|' + '---|' * len(bins)]
        for v in CLS_VARIANTS:
            rs = [r for r in sized if r['variant'] == v]
            if not rs:
                continue
            cells = []
            for b in bins:
                top1 = _mean_std([r['top1_by_size'][b]['top1'] for r in rs])[0]
                keep = _mean_std([r['top1_by_size'][b]['keep_stride4'] for r in rs])[0]
                cells.append(f'{top1:.1f} ({keep:.2f})')
            lines.append(f'| {v} | ' + ' | '.join(cells) + ' |')
        lines.append('')
    det = [r for r in rows if r['task'] == 'detection']
    if det:
        lines += ['**Detection** (Table 3 proxy: DiT-b0 Mask R-CNN, toy COCO set; dynamic at '
                  f'μ = {DET_MU})', '',
                  '| variant | seeds | bbox mAP | segm mAP | real FLOPs / C_base | '
                  'train step (s, fastest seed) |', '|---|---|---|---|---|---|']
        for r in det:
            segm = r['coco/segm_mAP']
            lines.append(
                f"| {r['variant']} | {len(r['seeds'])} | {r['metric'][0]:.3f} ± "
                f"{r['metric'][1]:.3f} | {segm[0]:.3f} ± {segm[1]:.3f} | "
                f"{r['real_flops_ratio'][0]:.3f} ± {r['real_flops_ratio'][1]:.3f} | "
                f"{r['step_time_s']:.3f} |")
    return '\n'.join(lines) + '\n'


def plot(runs: Sequence[Dict[str, Any]], out: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = aggregate(runs)
    tasks = [t for t in ('classification', 'detection') if any(r['task'] == t for r in rows)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for k, r in enumerate(x for x in rows if x['task'] == task):
            (m, sd), (f, fsd) = r['metric'], r['real_flops_ratio']
            ax.errorbar(f, m, xerr=fsd, yerr=sd, fmt='o', capsize=3, color=f'C{k}',
                        label=f"{r['variant']} ({len(r['seeds'])} seeds)")
        ax.set_xlabel('real backbone FLOPs / C_base (PVTv2-b0), val images')
        ax.set_ylabel('top-1 (%)' if task == 'classification' else 'bbox mAP')
        ax.set_title(f'{task}: metric vs real FLOPs (mean ± std over seeds)', fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_report(path: Path) -> None:
    runs = load_runs(path)
    if not runs:
        raise SystemExit(f'no runs in {path}')
    path.with_suffix('.md').write_text(markdown(runs))
    plot(runs, path.with_suffix('.png'))


# --------------------------------------------------------------------- main
def prepare_data(args: argparse.Namespace) -> Dict[str, str]:
    from dit_mm.datasets.toy_classification import generate_toy_classification
    from dit_mm.datasets.toy_data import generate_toy_dataset
    if args.quick:
        base = Path(args.work_dir) / 'data'
        cls = generate_toy_classification(base / 'toy_cls', num_train=24, num_val=12,
                                          image_size=(64, 64))
        det = generate_toy_dataset(base / 'toy', num_train=4, num_val=2, image_size=(96, 128))
    else:
        cls = generate_toy_classification(ROOT / 'data/toy_cls')
        det = generate_toy_dataset(ROOT / 'data/toy')
    return {'cls': str(cls['root']), 'det': str(det['root'])}


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    args = parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        if args.analyse:
            analyse(out, prepare_data(args)['cls'], args.analyse_seeds)
        write_report(out)
        print(out.with_suffix('.md').read_text())
        return load_runs(out)
    if args.quick:
        args.seeds = args.seeds[:1]
        args.cls_iters = args.cls_iters or 4
        args.det_iters = args.det_iters or 2
        args.flops_images = min(args.flops_images, 4)
        args.variants = args.variants or ['static', 'dynamic']
    data = prepare_data(args)
    done = {(r['task'], r['variant'], r['seed']) for r in load_runs(out)} if args.skip_done \
        else set()
    plan = []
    for seed in args.seeds:  # seed-major: an interrupted study has every variant
        for task in args.tasks:
            table = CLS_VARIANTS if task == 'classification' else DET_VARIANTS
            for variant in table:
                if (args.variants is None or variant in args.variants) and (
                        task, variant, seed) not in done:
                    plan.append((task, variant, seed))
    meta = {'command': 'python benchmarks/ablations.py ' + ' '.join(argv or sys.argv[1:]),
            'cls_config': CLS_CONFIG, 'det_config': DET_CONFIG, 'cls_mu': CLS_MU,
            'det_mu': DET_MU, 'torch_threads': os.environ.get('OMP_NUM_THREADS', 'default')}
    runs: List[Dict[str, Any]] = []
    start = time.perf_counter()
    for k, (task, variant, seed) in enumerate(plan):
        t0 = time.perf_counter()
        print(f'[{k + 1}/{len(plan)}] {task} {variant} seed {seed} ...', flush=True)
        rec = run_one(task, variant, seed, args, data)
        runs = merge(out, rec, meta)
        write_report(out)
        done = time.perf_counter() - start
        eta = done / (k + 1) * (len(plan) - k - 1)
        print(f'    {METRICS[task][0]} {rec["metric"]:.3f}, real FLOPs/C_base '
              f'{rec["real_flops_ratio"]:.3f}, step {rec["step_time_s"] or math.nan:.3f} s '
              f'({time.perf_counter() - t0:.0f} s; ETA {eta / 60:.0f} min)', flush=True)
    if args.analyse and runs:
        analyse(out, data['cls'], args.analyse_seeds)
        write_report(out)
    if runs:
        print(out.with_suffix('.md').read_text())
    return runs


if __name__ == '__main__':
    main()
