"""Static-shape routing on a trained model: accuracy and spend against the
eager threshold routing it stands for.

    python benchmarks/static_shapes_toy.py CONFIG CALIBRATED_CKPT [--budgets 1.0 0.8]
        [--num-images N] [--out FILE]

For the checkpoint at its calibrated offset and at each ``--budgets`` value
(read off its spend curve), evaluates on the config's val set (mmdet /
mmseg / mmpretrain metrics through ``tools/test.py``) and measures the
backbone spend per val image, for:

* ``eager``: threshold routing, per-image token counts (the reference);
* ``static_threshold``: static-shape routing, slots filled by the gate's
  kept tokens best first, padding discarded (``slot_policy='threshold'``);
* ``static_top``: static-shape routing, every slot kept (``'top'``).

Spend per image is the real backbone FLOPs of the tokens whose outputs are
used, over ``C_base``; for the static-shape forms the graph's own cost
(capacities, padding slots included) is reported beside it, and so is the
fraction of gated-node tokens that the capacities cut (kept by the gate but
over capacity). Written by the main job's model in ``docs/deployment.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from benchmarks.machine import machine, write_result  # noqa: E402
from dit_mm import analysis  # noqa: E402
from dit_mm.engine.hooks import find_dit  # noqa: E402

MODES = {'eager': dict(static_shapes=False),
         'static_threshold': dict(static_shapes=True, slot_policy='threshold'),
         'static_top': dict(static_shapes=True, slot_policy='top')}


@torch.no_grad()
def spends(cfg, model, setting: dict, budget, num_images) -> dict:
    """Per-image spend of the backbone over the val images."""
    backbone = find_dit(model)
    backbone.budget = budget
    backbone.slot_policy = setting.get('slot_policy', 'threshold')
    eager_keep = {}
    used, graph, cut = [], [], []
    for batch in analysis.iter_dataset_images(cfg, model, 'val', num_images):
        x = batch['inputs']
        if setting['static_shapes']:  # the eager decisions of this image, to count the cut
            backbone.static_shapes = False
            backbone(x)
            eager_keep = dict(backbone.last_record.masks)
        backbone.static_shapes = setting['static_shapes']
        backbone(x)
        f = backbone.flops()
        used.append(f['real'] / f['static'])
        if setting['static_shapes']:
            c = backbone.static_shape_cost(tuple(x.shape[2:]))
            graph.append(c['total'] / c['static'])
            kept = backbone.last_record.masks
            lost = sum(int((m & ~kept[n]).sum()) if n in kept else int(m.sum())
                       for n, m in eager_keep.items())
            cut.append(lost / max(1, sum(int(m.sum()) for m in eager_keep.values())))
    backbone.static_shapes = False
    out = dict(images=len(used), spend_mean=statistics.mean(used),
               spend_std=statistics.pstdev(used), spend_min=min(used), spend_max=max(used))
    if graph:
        out.update(graph_cost_mean=statistics.mean(graph),
                   kept_tokens_cut=statistics.mean(cut))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('config')
    p.add_argument('checkpoint')
    p.add_argument('--budgets', type=float, nargs='*', default=[0.8])
    p.add_argument('--num-images', type=int, default=None)
    p.add_argument('--cfg-options', nargs='*', default=[])
    p.add_argument('--capacity-scale', type=float, default=1.0,
                   help='DiT.capacity_scale of the static-shape forms')
    p.add_argument('--work-dir', default='work_dirs/static_shapes_toy')
    p.add_argument('--out')
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tools'))
    import test as test_tool
    cfg, model = analysis.load_model(args.config, args.checkpoint)
    find_dit(model).capacity_scale = args.capacity_scale
    res = dict(benchmark='static-shapes-toy', machine=machine('cpu'), config=args.config,
               checkpoint=args.checkpoint, capacity_scale=args.capacity_scale, results={})
    for budget in [None] + list(args.budgets):
        key = 'calibrated' if budget is None else f'budget_{budget:g}'
        res['results'][key] = {}
        for mode, setting in MODES.items():
            row = spends(cfg, model, setting, budget, args.num_images)
            # one work dir for every run: mmengine's visualizer outlives a Runner
            argv_t = [args.config, args.checkpoint, '--work-dir', args.work_dir]
            if budget is not None:
                argv_t += ['--budget', str(budget)]
            if setting['static_shapes']:
                argv_t += ['--static-shapes']
            opts = list(args.cfg_options)
            if setting['static_shapes']:
                opts += [f"model.backbone.slot_policy={setting['slot_policy']}",
                         f'model.backbone.capacity_scale={args.capacity_scale}']
            if opts:
                argv_t += ['--cfg-options', *opts]
            metrics = test_tool.main(argv_t)
            row['metrics'] = {k: float(v) for k, v in metrics.items()}
            res['results'][key][mode] = row
            print(key, mode, json.dumps(row), flush=True)
    scale = '' if args.capacity_scale == 1.0 else f'-scale{args.capacity_scale:g}'
    write_result(res, args.out, f'static-shapes-toy-main-job{scale}.json')
    return res


if __name__ == '__main__':
    main()
