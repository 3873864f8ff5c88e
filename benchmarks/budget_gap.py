"""Why a trained DiT's inference spend misses its budget mu: a decomposition.

    python benchmarks/budget_gap.py CONFIG CKPT [CKPT ...] [--mu 1.0] [--out FILE.json]

For each checkpoint, on the training images (test pipeline) and on the val
images, the mean real backbone FLOPs / C_base of four ways to decide:

* ``eval``: what inference does: EMA gate weights, deterministic ``delta > 0``;
* ``live``: the live (optimised) gate weights, deterministic: ``eval - live``
  is the EMA's lag;
* ``sampled``: the live weights with Gumbel noise at the temperature the run
  ended with (the training decisions, without the training augmentation):
  ``live - sampled`` is the gap between noisy training decisions and
  deterministic eval decisions;
* ``expected``: the expected cost of those decisions (what the budget loss
  pulls toward mu).

``train`` against ``val`` is the data's share. Mean over 3 noise draws for
``sampled`` and ``expected``. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path
from typing import Iterator

try:
    import dit_mm  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from dit_mm import analysis
from dit_mm.analysis.calibration import collect_inputs
from dit_mm.engine.hooks import find_dit
from dit_mm.models.backbone import DiT

MODES = ('eval', 'live', 'sampled', 'expected')


def _gates(backbone: DiT) -> list:
    return list(backbone.row_gates.values()) + list(backbone.col_gates.values())


@contextlib.contextmanager
def live_weights(backbone: DiT) -> Iterator[None]:
    """Eval decisions from the live gate weights (EMA buffers swapped)."""
    saved = [(g.ema_weight.clone(), g.ema_bias.clone()) for g in _gates(backbone)]
    with torch.no_grad():
        for g in _gates(backbone):
            g.ema_weight.copy_(g.proj.weight)
            g.ema_bias.copy_(g.proj.bias)
    try:
        yield
    finally:
        with torch.no_grad():
            for g, (w, b) in zip(_gates(backbone), saved):
                g.ema_weight.copy_(w)
                g.ema_bias.copy_(b)


@contextlib.contextmanager
def sampled_gates(backbone: DiT) -> Iterator[None]:
    """Training decisions (live weights + Gumbel noise at the backbone's
    temperature) inside an eval-mode backbone."""
    for g in _gates(backbone):
        g.train()
    try:
        yield
    finally:
        for g in _gates(backbone):
            g.eval()


@torch.no_grad()
def _spend(backbone: DiT, inputs: list[torch.Tensor]) -> tuple[float, float]:
    real = exp = 0.0
    for x in inputs:
        backbone(x)
        f = backbone.flops(per_image=True)
        real += float(f['real'].mean()) / f['static']
        exp += float(f['expected'].mean()) / f['static']
    return real / len(inputs), exp / len(inputs)


def decompose(backbone: DiT, inputs: list[torch.Tensor], draws: int = 3) -> dict[str, float]:
    backbone.eval()
    out = {'eval': _spend(backbone, inputs)[0]}
    with live_weights(backbone):
        out['live'] = _spend(backbone, inputs)[0]
    real, exp = [], []
    with sampled_gates(backbone):
        for d in range(draws):
            torch.manual_seed(d)
            r, e = _spend(backbone, inputs)
            real.append(r)
            exp.append(e)
    out['sampled'], out['expected'] = statistics.mean(real), statistics.mean(exp)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config')
    parser.add_argument('checkpoints', nargs='+')
    parser.add_argument('--mu', type=float, default=None, help="default: the config's")
    parser.add_argument('--out', default=None)
    args = parser.parse_args(argv)
    rows = []
    for ckpt in args.checkpoints:
        cfg, model = analysis.load_model(args.config, ckpt)
        backbone = find_dit(model)
        mu = args.mu if args.mu is not None else analysis.budget_mu(cfg)
        row = dict(checkpoint=ckpt, mu=mu, tau=backbone.gate_tau,
                   ema_steps=int(backbone.gate_ema_steps))
        for split in ('train', 'val'):
            row[split] = decompose(backbone, collect_inputs(cfg, model, split))
        rows.append(row)
        print(f'{ckpt}: ' + '; '.join(
            f"{s}: " + ', '.join(f'{m} {row[s][m]:.3f}' for m in MODES) for s in ('train', 'val')),
            flush=True)
    summary = {}
    for split in ('train', 'val'):
        for m in MODES:
            vals = [r[split][m] for r in rows]
            summary[f'{split}/{m}'] = (statistics.mean(vals),
                                       statistics.stdev(vals) if len(vals) > 1 else 0.0)
        misses = [abs(r[split]['eval'] - r['mu']) for r in rows]
        summary[f'{split}/|eval-mu|'] = (statistics.mean(misses),
                                         statistics.stdev(misses) if len(misses) > 1 else 0.0)
    print('\n| split | ' + ' | '.join(MODES) + ' | mean abs(eval - mu) |')
    print('|---|' + '---|' * (len(MODES) + 1))
    for split in ('train', 'val'):
        print(f'| {split} | ' + ' | '.join(
            f'{summary[f"{split}/{m}"][0]:.3f} ± {summary[f"{split}/{m}"][1]:.3f}' for m in MODES)
            + f' | {summary[f"{split}/|eval-mu|"][0]:.3f} |')
    res = dict(config=args.config, rows=rows, summary=summary)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == '__main__':
    main()
