"""Which tokens DiT computed, per grid node, for one image (paper Fig. 3).

    python tools/visualize_routing.py CONFIG --checkpoint CKPT --img demo.jpg \\
        --out routing.png
    python tools/visualize_routing.py CONFIG --checkpoint CKPT --index 3

The image goes through the config's test pipeline and the model in eval mode
(the full model, so the routing is exactly that of inference). The figure
shows the network input on the left and a 4 x 4 grid of panels on the right:
rows are the scales (stride 4, 8, 16, 32), columns the stages 1-4. Each
panel of a grid node ``(scale i, stage j)``, ``i <= j``, overlays the image
with its token map: computed tokens white, skipped tokens black, titled with
the kept fraction. Nodes that ran without a gate (e.g. PVTv2's diagonal in
``routing='static'``) are all white ("dense"); nodes whose row edge did not
run (e.g. the off-diagonal nodes in static routing) are grey and labelled
"not run"; cells below the diagonal are not part of the triangular grid.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
from collections.abc import Iterable
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

from dit_mm import analysis
from dit_mm.models.grid import NUM_SCALES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(
        description='Plot the tokens each DiT grid node computed for one image (Fig. 3)')
    analysis.add_model_args(parser)
    parser.add_argument('--img', help='image file (run through the config\'s test pipeline)')
    parser.add_argument('--index', type=int, default=0,
                        help='without --img: index of the image in the config\'s val/test set '
                        '(default: 0)')
    parser.add_argument('--split', choices=['val', 'test'], default='val',
                        help='data set for --index, and whose pipeline --img uses')
    parser.add_argument('--routing', choices=['dynamic', 'static', 'full'],
                        help='override the backbone\'s routing mode')
    parser.add_argument('--out', default='routing.png', help='output PNG (default: routing.png)')
    parser.add_argument('--dpi', type=int, default=110, help='resolution of the PNG')
    return parser.parse_args(argv)


def plot_routing(image: np.ndarray, masks: dict[Any, torch.Tensor | None],
                 title: str, out: str, dpi: int = 110, ungated: Iterable[Any] = ()) -> None:
    """Draws the input and the per-node token maps into ``out``.

    Args:
        image: ``(H, W, 3)`` RGB in ``[0, 1]`` (the padded network input).
        masks: Node ``(i, j)`` -> boolean ``(h, w)`` computed-token map, or
            ``None`` for a node that did not run (see
            :func:`dit_mm.analysis.node_masks`).
        title: Figure title.
        out: PNG path.
        dpi: Resolution.
        ungated: Nodes that ran every token without a gate (labelled "dense").
    """
    ungated = set(ungated)
    H, W = image.shape[:2]
    aspect = H / W
    panel = 2.1
    height = panel * aspect * NUM_SCALES * 1.25 + 1.3
    fig = plt.figure(figsize=(panel * (NUM_SCALES + 2.2), height))
    grid = fig.add_gridspec(NUM_SCALES, NUM_SCALES + 2, width_ratios=[2.1, 0.1] + [1] * 4,
                            left=0.02, right=0.99, top=1 - 1.2 / height, bottom=0.02,
                            wspace=0.06, hspace=0.3)
    ax = fig.add_subplot(grid[:, 0])
    ax.imshow(image)
    ax.set_title(f'input {H}x{W}', fontsize=10)
    ax.axis('off')
    grey = image.mean(axis=2, keepdims=True).repeat(3, axis=2)
    extent = (0, W, H, 0)
    for i in range(NUM_SCALES):
        for j in range(NUM_SCALES):
            ax = fig.add_subplot(grid[i, j + 2])
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(f'stride {4 * 2 ** i}', fontsize=10)
            if i == 0:
                ax.text(0.5, 1.25, f'stage {j + 1}', transform=ax.transAxes, ha='center',
                        fontsize=11, fontweight='bold')
            if i > j:
                for side in ax.spines.values():
                    side.set_visible(False)
                continue
            mask = masks.get((i, j))
            if mask is None:
                ax.imshow(np.full((H, W, 3), 0.55), extent=extent)
                ax.set_title('not run', fontsize=9, color='dimgray')
                continue
            m = mask.numpy().astype(np.float32)
            overlay = np.zeros((*m.shape, 4), np.float32)
            overlay[..., :3] = m[..., None]
            overlay[..., 3] = np.where(m > 0, 0.55, 0.8)
            ax.imshow(grey, extent=extent)
            ax.imshow(overlay, extent=extent, interpolation='nearest')
            keep = 100.0 * float(m.mean())
            label = 'dense, no gate' if (i, j) in ungated else f'keep {keep:.0f}%'
            ax.set_title(label, fontsize=9)
            ax.set_xlim(0, W)
            ax.set_ylim(H, 0)
    fig.suptitle(title, fontsize=10, y=0.995, va='top')
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point; returns ``{'out', 'keep': {node_key: fraction or None}, 'gflops'}``."""
    args = parse_args(argv)
    analysis.check_paths(args.config, args.checkpoint)
    if args.img is not None and not osp.isfile(args.img):
        raise SystemExit(f'image not found: {args.img}')
    cfg, model = analysis.load_model(args.config, args.checkpoint, args.cfg_options,
                                     device=args.device)
    backbone = model.backbone
    if args.routing:
        backbone.routing = args.routing
    if args.img is not None:
        batch = analysis.load_image(cfg, model, args.img, args.split)
        name = osp.basename(args.img)
    else:
        try:
            batch = analysis.dataset_item(cfg, model, args.index, args.split)
        except IndexError as err:
            raise SystemExit(str(err)) from err
        name = f'{args.split}[{args.index}]'
    model.predict(batch['inputs'], batch['data_samples'])  # the whole model, as in inference
    masks = analysis.node_masks(backbone)
    flops = backbone.flops()
    image = analysis.denormalize(model, batch['inputs'][0]).numpy()
    title = (f'{osp.basename(args.config)} - {name} - routing={backbone.routing}\n'
             f"backbone {flops['real']:.2f} GFLOPs real, {float(flops['expected']):.2f} "
             f"expected, PVTv2 {flops['static']:.2f}; white = computed, black = skipped")
    ungated = [n for n, m in masks.items()
               if m is not None and n not in backbone.last_record.masks]
    plot_routing(image, masks, title, args.out, args.dpi, ungated=ungated)
    keep = {f's{i}_t{j}': (None if m is None else float(m.float().mean()))
            for (i, j), m in masks.items()}
    print(f'{name}: input {image.shape[0]}x{image.shape[1]}, backbone real '
          f"{flops['real']:.3f} GFLOPs (PVTv2 {flops['static']:.3f})")
    print('kept fraction per node: ' + ', '.join(
        f'{k}={"not run" if v is None else f"{v:.2f}"}' for k, v in keep.items()))
    print(f'figure written to {args.out}')
    return {'out': args.out, 'keep': keep, 'gflops': {k: float(v) for k, v in flops.items()}}


if __name__ == '__main__':
    main()
