"""Convert a PVTv2 checkpoint (official release, mmdet or timm layout) into a
DiT state dict, so that a config can load it with ``load_from`` or
``init_cfg=dict(type='Pretrained', checkpoint=OUT)``.

    python tools/convert_pvtv2.py pvt_v2_b2.pth dit_b2_from_pvtv2.pth --arch b2

The diagonal (PVTv2's path) takes the weights as they are, the extra grid
nodes start from the same stage's blocks, the gates keep their init.
"""
import argparse
import os.path as osp
from typing import List, Optional

import torch
from mmengine.runner import CheckpointLoader

from dit_mm import DiT
from dit_mm.models.weights import check_pvt_checkpoint, convert_pvt_state_dict, load_converted


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='PVTv2 checkpoint (file path or URL)')
    parser.add_argument('dst', help='output .pth with a DiT state_dict')
    parser.add_argument('--arch', default='b2', help="DiT arch 'b0'..'b5'")
    parser.add_argument('--allow-missing', action='store_true',
                        help='accept a checkpoint that does not cover the arch (the weights it '
                             'lacks keep their random init)')
    args = parser.parse_args(argv)
    if '://' not in args.src and not osp.isfile(args.src):
        raise SystemExit(f'checkpoint not found: {args.src}')
    model = DiT(arch=args.arch)
    model.init_weights()
    ckpt = CheckpointLoader.load_checkpoint(args.src, map_location='cpu')
    state, layout = convert_pvt_state_dict(ckpt, model)
    try:
        if layout != 'dit':
            check_pvt_checkpoint(model, state, args.src, args.allow_missing)
    except ValueError as e:
        raise SystemExit(str(e).replace("init_cfg=dict(type='Pretrained', checkpoint=..., "
                                        'allow_missing=True)', '--allow-missing')) from None
    report = load_converted(model, state, source=args.src)  # raises on a wrong arch
    torch.save(dict(state_dict=model.state_dict(),
                    meta=dict(source=args.src, layout=layout, arch=args.arch, **report)),
               args.dst)
    print(f'{args.src} ({layout} layout) -> {args.dst}: DiT-{args.arch}, '
          f'{len(state)} tensors from PVTv2, {len(report["missing"])} missing, '
          f'{len(report["unexpected"])} unused')


if __name__ == '__main__':
    main()
