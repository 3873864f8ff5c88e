"""Skip ratio of every DiT grid node over a data set (paper Fig. 4).

    python tools/routing_stats.py CONFIG --checkpoint CKPT --num-images 100 \\
        --out-dir work_dirs/x/routing

Runs the model's backbone in eval mode on the first N images of the config's
val (or test) set through its test pipeline and, per grid node ``(scale i,
stage j)``, averages over the images the fraction of tokens it skipped
(``1 - kept``, from the hard gate decisions; 1 for a node that did not run).
Writes into ``--out-dir``:

* ``routing_stats.png``: heat map scale x stage of the mean skip ratio, and
  the same numbers as grouped bars (one group per stage, one bar per scale,
  with the standard deviation over images);
* ``routing_stats.csv`` and ``routing_stats.json``: the per-node table, plus
  column-edge open fractions and the mean backbone GFLOPs (JSON);

and prints the table as markdown.

**Side by side** (Fig. 4 sets a classification set beside a detection set):
``--compare CONFIG2 [--compare-checkpoint CKPT2]`` measures a second model or
data set (mmdet, mmseg or mmpretrain config, in any pairing) the same way and
also writes ``routing_stats_compare.png`` (both heat maps and the skip ratios
of both as paired bars) and ``routing_stats_compare.json``; ``--labels A B``
names the two. The same config twice with two checkpoints compares models;
two configs with one model's checkpoint compare data sets.

    python tools/routing_stats.py configs/classification/dit_b0_toy.py \
        --checkpoint cls.pth --compare configs/detection/mask_rcnn_dit_b0_toy.py \
        --compare-checkpoint det.pth --labels "toy classification" "toy COCO" --out-dir d
"""
from __future__ import annotations

import argparse
import csv
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

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import torch
from mmengine.config import DictAction

from dit_mm import analysis
from dit_mm.models.grid import NUM_SCALES

COLUMNS = ('node', 'scale', 'stride', 'stage', 'diagonal', 'gated', 'ran_frac', 'skip_real',
           'skip_real_std', 'skip_expected', 'column_open')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(
        description='Per-node skip ratio of a DiT model over a data set (Fig. 4)')
    analysis.add_model_args(parser)
    parser.add_argument('--num-images', type=int, default=100,
                        help='number of images of the data set (default: 100, or all if fewer)')
    parser.add_argument('--split', choices=['val', 'test'], default='val',
                        help='data loader of the config to read images from')
    parser.add_argument('--routing', choices=['dynamic', 'static', 'full'],
                        help='override the backbone\'s routing mode')
    parser.add_argument('--out-dir', default='routing_stats',
                        help='output folder (default: routing_stats)')
    parser.add_argument('--compare', metavar='CONFIG2',
                        help='a second config (model or data set) to draw side by side')
    parser.add_argument('--compare-checkpoint', metavar='CKPT2',
                        help='checkpoint of the second model (default: --checkpoint, i.e. '
                        'the same model on the second config\'s data)')
    parser.add_argument('--compare-cfg-options', nargs='+', action=DictAction,
                        help='overrides for CONFIG2 (key=value)')
    parser.add_argument('--labels', nargs=2, metavar=('A', 'B'),
                        help='names of the two sides (default: the config names)')
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error('--num-images must be >= 1')
    if args.compare is None and (args.compare_checkpoint or args.labels
                                 or args.compare_cfg_options):
        parser.error('--compare-checkpoint, --compare-cfg-options and --labels need --compare')
    return args


def table_rows(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per grid node (execution order) with the :data:`COLUMNS`."""
    rows = []
    for key, n in stats['nodes'].items():
        col = stats['column_edges'].get(key)
        rows.append({'node': key, 'scale': n['scale'], 'stride': n['stride'],
                     'stage': n['stage'] + 1, 'diagonal': n['diagonal'], 'gated': n['gated'],
                     'ran_frac': n['ran_frac'], 'skip_real': n['skip_real'],
                     'skip_real_std': n['skip_real_std'], 'skip_expected': n['skip_expected'],
                     'column_open': None if col is None else col['open_real']})
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The node table as GitHub markdown."""
    head = ('node', 'stride', 'stage', 'PVTv2 path', 'gated', 'ran on', 'skip (real)',
            'skip (expected)', 'column edge open')
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        col = '-' if r['column_open'] is None else f"{r['column_open']:.2f}"
        lines.append(
            f"| {r['node']} | {r['stride']} | {r['stage']} | {'yes' if r['diagonal'] else ''} | "
            f"{'yes' if r['gated'] else 'no'} | {100 * r['ran_frac']:.0f}% | "
            f"{r['skip_real']:.3f} ± {r['skip_real_std']:.3f} | {r['skip_expected']:.3f} | "
            f'{col} |')
    return '\n'.join(lines)


def plot_stats(stats: dict[str, Any], title: str, out: str) -> None:
    """Heat map (scale x stage) and grouped bars of the mean skip ratio."""
    skip = np.full((NUM_SCALES, NUM_SCALES), np.nan)
    std = np.zeros((NUM_SCALES, NUM_SCALES))
    for n in stats['nodes'].values():
        skip[n['scale'], n['stage']] = n['skip_real']
        std[n['scale'], n['stage']] = n['skip_real_std']
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.8),
                                   gridspec_kw={'width_ratios': [1, 1.3]})
    cmap = plt.get_cmap('viridis').with_extremes(bad='white')
    im = ax0.imshow(np.ma.masked_invalid(skip), cmap=cmap, vmin=0, vmax=1)
    for i in range(NUM_SCALES):
        for j in range(NUM_SCALES):
            if math.isnan(skip[i, j]):
                continue
            node = stats['nodes'][f's{i}_t{j}']
            text = f'{skip[i, j]:.2f}' if node['evaluated'] else 'not run'
            ax0.text(j, i, text, ha='center', va='center', fontsize=10,
                     color='white' if skip[i, j] < 0.6 else 'black')
    ax0.set_xticks(range(NUM_SCALES), [f'stage {j + 1}' for j in range(NUM_SCALES)])
    ax0.set_yticks(range(NUM_SCALES), [f'stride {4 * 2 ** i}' for i in range(NUM_SCALES)])
    for i in range(NUM_SCALES):  # PVTv2's own path
        ax0.add_patch(plt.Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor='red',
                                    linewidth=2))
    ax0.set_title('mean skip ratio per node (1 - kept tokens)\nred frame: PVTv2 path',
                  fontsize=10)
    fig.colorbar(im, ax=ax0, fraction=0.046, pad=0.04, label='skip ratio')

    width = 0.2
    colors = plt.get_cmap('tab10').colors
    for i in range(NUM_SCALES):
        xs = [j + (i - 1.5) * width for j in range(i, NUM_SCALES)]
        means = [skip[i, j] for j in range(i, NUM_SCALES)]
        errs = [std[i, j] for j in range(i, NUM_SCALES)]
        yerr = [[min(e, m) for m, e in zip(means, errs, strict=True)],  # stay inside [0, 1]
                [min(e, 1 - m) for m, e in zip(means, errs, strict=True)]]
        ax1.bar(xs, means, width, yerr=yerr, capsize=2,
                color=colors[i], label=f'stride {4 * 2 ** i}')
    ax1.set_xticks(range(NUM_SCALES), [f'stage {j + 1}' for j in range(NUM_SCALES)])
    ax1.set_ylim(0, 1.05)
    ax1.set_ylabel('skip ratio (mean ± std over images)')
    ax1.set_title('skip ratio by stage and scale', fontsize=10)
    ax1.legend(fontsize=8, loc='upper left')
    ax1.grid(axis='y', alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_compare(sides: list[tuple[str, dict[str, Any]]], out: str) -> None:
    """Two heat maps (scale x stage) and paired bars of the mean skip ratio
    per node: the two sides of Fig. 4."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={'width_ratios': [1, 1, 1.6]})
    cmap = plt.get_cmap('viridis').with_extremes(bad='white')
    for ax, (label, stats) in zip(axes[:2], sides):
        skip = np.full((NUM_SCALES, NUM_SCALES), np.nan)
        for n in stats['nodes'].values():
            skip[n['scale'], n['stage']] = n['skip_real']
        ax.imshow(np.ma.masked_invalid(skip), cmap=cmap, vmin=0, vmax=1)
        for i in range(NUM_SCALES):
            for j in range(i, NUM_SCALES):
                ax.text(j, i, f'{skip[i, j]:.2f}', ha='center', va='center', fontsize=10,
                        color='white' if skip[i, j] < 0.6 else 'black')
        ax.set_xticks(range(NUM_SCALES), [f'stage {j + 1}' for j in range(NUM_SCALES)])
        ax.set_yticks(range(NUM_SCALES), [f'stride {4 * 2 ** i}' for i in range(NUM_SCALES)])
        ax.set_title(f"{label}\n{stats['num_images']} images, real/C_base "
                     f"{stats['ratios']['real/C_base']:.2f}", fontsize=10)
    ax = axes[2]
    keys = list(sides[0][1]['nodes'])
    xs = np.arange(len(keys))
    for k, (label, stats) in enumerate(sides):
        means = [stats['nodes'][key]['skip_real'] for key in keys]
        errs = [stats['nodes'][key]['skip_real_std'] for key in keys]
        yerr = [[min(e, m) for m, e in zip(means, errs)], [min(e, 1 - m) for m, e in
                                                           zip(means, errs)]]
        ax.bar(xs + (k - 0.5) * 0.38, means, 0.38, yerr=yerr, capsize=2, label=label)
    ax.set_xticks(xs, [f"{key}\n/{sides[0][1]['nodes'][key]['stride']}" for key in keys],
                  fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel('skip ratio (mean ± std over images)')
    ax.set_title('skip ratio per node (s = scale, t = stage; /stride)', fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis='y', alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def measure(config: str, checkpoint: str | None, cfg_options: dict | None,
            args: argparse.Namespace) -> dict[str, Any]:
    """Routing statistics of one model over its config's val/test images."""
    from mmengine.utils import ProgressBar
    analysis.check_paths(config, checkpoint)
    cfg, model = analysis.load_model(config, checkpoint, cfg_options, device=args.device)
    if args.routing:
        model.backbone.routing = args.routing
    total = min(args.num_images, analysis.dataset_size(cfg, args.split))
    if total == 0:
        raise SystemExit(f'{config}: the {args.split} set is empty')
    bar = ProgressBar(total, file=sys.stderr) if total > 1 else None
    stats = analysis.routing_stats(
        model, analysis.iter_dataset_images(cfg, model, args.split, total), whole_model=False,
        mu=analysis.budget_mu(cfg), progress=bar.update if bar else None)
    if bar is not None:
        sys.stderr.write('\n')
    stats.update(config=config, checkpoint=checkpoint, split=args.split,
                 task=analysis.task_of(cfg))
    return stats


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point; returns the statistics (also written to ``--out-dir``;
    with ``--compare``, the second side's are under ``'compare'``)."""
    args = parse_args(argv)
    stats = measure(args.config, args.checkpoint, args.cfg_options, args)
    rows = table_rows(stats)

    os.makedirs(args.out_dir, exist_ok=True)
    png = osp.join(args.out_dir, 'routing_stats.png')
    csv_path = osp.join(args.out_dir, 'routing_stats.csv')
    json_path = osp.join(args.out_dir, 'routing_stats.json')
    bb = stats['gflops']['backbone']
    title = (f"{osp.basename(args.config)} - routing={stats['routing']} - "
             f"{stats['num_images']} {args.split} images - backbone {bb['real']:.2f} GFLOPs "
             f"real vs PVTv2 {bb['static']:.2f} (x{stats['ratios']['real/C_base']:.2f})")
    plot_stats(stats, title, png)
    with open(csv_path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with open(json_path, 'w') as f:
        json.dump(dict(stats, table=rows), f, indent=2)

    print(f"{stats['num_images']} images ({', '.join(stats['input_sizes'])}), "
          f"routing={stats['routing']}")
    print(markdown_table(rows))
    mu = stats['mu']
    print(f"\nbackbone GFLOPs/image: real {bb['real']:.3f}, expected {bb['expected']:.3f}, "
          f"PVTv2 static {bb['static']:.3f}; real/C_base {stats['ratios']['real/C_base']:.3f}"
          + (f', budget mu {mu:.3f}' if mu is not None else ''))
    print(f'written: {png}, {csv_path}, {json_path}')
    if args.compare:
        other = measure(args.compare, args.compare_checkpoint or args.checkpoint,
                        args.compare_cfg_options, args)
        labels = args.labels or [osp.splitext(osp.basename(c))[0]
                                 for c in (args.config, args.compare)]
        sides = [(labels[0], stats), (labels[1], other)]
        cpng = osp.join(args.out_dir, 'routing_stats_compare.png')
        cjson = osp.join(args.out_dir, 'routing_stats_compare.json')
        plot_compare(sides, cpng)
        with open(cjson, 'w') as f:
            json.dump({label: dict(s, table=table_rows(s)) for label, s in sides}, f, indent=2)
        print(f'\n{labels[1]}:')
        print(markdown_table(table_rows(other)))
        print(f'written: {cpng}, {cjson}')
        stats['compare'] = other
    return stats


if __name__ == '__main__':
    main()
