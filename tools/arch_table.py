"""Parameters and GFLOPs at 224x224 of DiT-B1..B5 next to the paper's Table 1.

    python tools/arch_table.py [--size 224 224] [--archs b1 b2 b3 b4 b5]

``static`` is PVTv2's own path (= C_base), ``full`` every grid node and token,
``dynamic@init`` the expected cost of the untrained gates at their init (eval,
random weights: it only shows where a model starts before the budget loss
pulls it to mu x C_base).
"""
import argparse
from typing import List, Optional

import torch

from dit_mm import DiT

PAPER = {'b1': (30.3, 2.0), 'b2': (55.9, 3.8), 'b3': (86.3, 6.8), 'b4': (126.0, 9.9),
         'b5': (158.0, 10.3)}
PVT = {'b1': (13.1, 2.1), 'b2': (25.4, 4.0), 'b3': (45.2, 6.9), 'b4': (62.6, 10.1),
       'b5': (82.0, 11.8)}


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--size', type=int, nargs=2, default=(224, 224))
    parser.add_argument('--archs', nargs='+', default=list(PAPER))
    args = parser.parse_args(argv)
    print('| arch | params (M) | paper params | PVTv2 params | static GF (=PVTv2) | full GF '
          '| full/static | dynamic@init GF | paper DiT GF | paper PVTv2 GF |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for arch in args.archs:
        model = DiT(arch).eval()
        model.init_weights()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        with torch.no_grad():
            model(torch.randn(1, 3, *args.size))
        f = model.flops()
        paper, pvt = PAPER.get(arch, ('-', '-')), PVT.get(arch, ('-', '-'))
        print(f'| {arch} | {params:.1f} | {paper[0]} | {pvt[0]} | {f["static"]:.2f} | '
              f'{f["full"]:.2f} | {f["full"] / f["static"]:.2f} | {float(f["expected"]):.2f} | '
              f'{paper[1]} | {pvt[1]} |')


if __name__ == '__main__':
    main()
