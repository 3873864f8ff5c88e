"""Generate the synthetic toy data sets: detection/segmentation or classification.

Examples::

    # COCO instances + ADE20K-style semantic segmentation (the main job's data)
    python tools/make_toy_data.py --out data/toy --num-train 576 --num-val 144 --size 256 320
    # mmpretrain CustomDataset folders, one shape per image at 6 px .. 0.9 x the image
    python tools/make_toy_data.py --task classification --out data/toy_cls
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from dit_mm.datasets.toy_classification import generate_toy_classification
    from dit_mm.datasets.toy_data import generate_toy_dataset
except ImportError:  # running from a checkout without an installed dit_mm
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dit_mm.datasets.toy_classification import generate_toy_classification
    from dit_mm.datasets.toy_data import generate_toy_dataset

# defaults per task: (out, num_train, num_val, (H, W))
DEFAULTS = {'detection': ('data/toy', 576, 144, (256, 320)),
            'classification': ('data/toy_cls', 1800, 600, (96, 96))}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--task', choices=sorted(DEFAULTS), default='detection',
                        help='detection: COCO + semantic seg (default); classification: '
                        'mmpretrain class folders')
    parser.add_argument('--out', help='output folder (default: data/toy, or data/toy_cls)')
    parser.add_argument('--num-train', type=int, help='training images (default: 576 / 1800)')
    parser.add_argument('--num-val', type=int, help='validation images (default: 144 / 600)')
    parser.add_argument('--size', type=int, nargs=2, metavar=('H', 'W'),
                        help='image height and width (default: 256 320 / 96 96)')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    parser.add_argument('--overwrite', action='store_true',
                        help='regenerate even if a matching set exists')
    args = parser.parse_args(argv)
    out, num_train, num_val, size = DEFAULTS[args.task]
    args.out = args.out or out
    args.num_train = num_train if args.num_train is None else args.num_train
    args.num_val = num_val if args.num_val is None else args.num_val
    args.size = tuple(args.size or size)
    return args


def main(argv: list[str] | None = None) -> dict:
    """Runs the generator and prints a one-paragraph summary."""
    args = parse_args(argv)
    if args.task == 'classification':
        info = generate_toy_classification(args.out, num_train=args.num_train,
                                           num_val=args.num_val, image_size=args.size,
                                           seed=args.seed, overwrite=args.overwrite)
        state = 'generated' if info['regenerated'] else 'already up to date'
        h, w = info['image_size']
        lo, hi = info['size_range']
        print(f'toy classification data {state} in {info["root"]}: {info["num_train"]} train + '
              f'{info["num_val"]} val images ({h}x{w}), {len(info["classes"])} classes '
              f'{", ".join(info["classes"])}; objects {lo:.0f}-{hi:.0f} px')
        return info
    info = generate_toy_dataset(args.out, num_train=args.num_train, num_val=args.num_val,
                                image_size=tuple(args.size), seed=args.seed,
                                overwrite=args.overwrite)
    h, w = info['image_size']
    state = 'generated' if info['regenerated'] else 'already up to date'
    print(f'toy data {state} in {info["root"]}: {info["num_train"]} train + '
          f'{info["num_val"]} val images ({h}x{w}), '
          f'instances {info["num_instances"]}')
    print(f'  COCO: {info["coco_root"]}  (annotations/instances_{{train,val}}.json)')
    print(f'  seg : {info["seg_root"]}  (images|annotations/{{training,validation}})')
    return info


if __name__ == '__main__':
    main()
