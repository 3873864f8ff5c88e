"""Generate the synthetic toy shapes data set (COCO instances + ADE20K-style semantic seg).

Example::

    python tools/make_toy_data.py --out data/toy --num-train 48 --num-val 16 --size 256 320
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from dit_mm.toy_data import generate_toy_dataset
except ImportError:  # running from a checkout without an installed dit_mm
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dit_mm.toy_data import generate_toy_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='data/toy', help='output folder (default: data/toy)')
    parser.add_argument('--num-train', type=int, default=48, help='training images')
    parser.add_argument('--num-val', type=int, default=16, help='validation images')
    parser.add_argument('--size', type=int, nargs=2, default=(256, 320), metavar=('H', 'W'),
                        help='image height and width')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    parser.add_argument('--overwrite', action='store_true',
                        help='regenerate even if a matching set exists')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Runs the generator and prints a one-paragraph summary."""
    args = parse_args(argv)
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
