"""CUDA check of DiT, for a machine with a GPU (CI has none).

    python benchmarks/check_cuda.py [--out DIR] [--timings 4x512 ...]
                                    # writes DIR/check_cuda.json

1. A ``RoutedStage``'s inference on CUDA, through the dense route (the
   default off the CPU above 60 % kept) and packed, against the masked path and
   against the CPU; the CPU-only kernels must be off.
2. DiT-b0 outputs and real FLOPs on the CPU and on CUDA, per routing mode.
3. A training step on CUDA with the budget loss, dense masked and
   ``sparse_training=True``: finite loss and gradients.
4. DiT-b2 latency at 512x512, batch 4 (``--timings``: other batches and
   sizes; unequal per-image keep ratios at batch > 1), interleaved medians
   with the device synchronised: with the dense route
   (``dense_above_accelerator = 0``), with packing forced (``1``), and with
   the default (``blocks.DENSE_ABOVE_ACCELERATOR``).

Runs on NVIDIA H200 machines (torch 2.11): all differences <= 1e-5. DiT-b2
at 512x512, batch 4 (six runs): r = 1 32-34 ms, r = 0.75 / 0.5 / 0.25 40-54
ms on the dense route and 36-71 ms packed, static 11.6-14.9 ms: no savings.
Larger inputs (r = 1, then packed at r = 0.5 / 0.25): 1024x1024, batch 8
(four runs): 253-254, 210-217 / 153-163 ms; 512x512, batch 32 (three runs):
189-190, 195-205 / 156-169 ms; 1024x1024, batch 2 (two runs): 72, 64 / 50 ms.
See blocks.DENSE_ABOVE_ACCELERATOR for the threshold this sets.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from dit_mm import DiT  # noqa: E402
from dit_mm.accel.cpu.onednn import packed_applies  # noqa: E402
from dit_mm.accel.cpu.sparse_ops import kernel_applies  # noqa: E402
from dit_mm.models import blocks  # noqa: E402
from dit_mm.models.blocks import RoutedStage  # noqa: E402


def check_stage(dev: str) -> dict:
    stage = RoutedStage(dim=64, depth=2, num_heads=2, sr_ratio=2, mlp_ratio=4).eval()
    for p in stage.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    x = torch.randn(4, 24 * 24, 64)
    keep = torch.rand(4, 576) < torch.tensor([[0.2], [0.0], [0.5], [0.9]])
    with torch.no_grad():
        on_cpu = stage.forward_sparse(x, (24, 24), keep)
        stage.to(dev)
        xd, kd = x.to(dev), keep.to(dev)
        stage.dense_above_accelerator = 0.0  # the dense route with held tokens
        held = stage.forward_sparse(xd, (24, 24), kd)
        masked = stage.forward_masked(xd, (24, 24), kd.float())
        stage.dense_above_accelerator = 1.0
        packed = stage.forward_sparse(xd, (24, 24), kd)
        cpu_only = dict(packed_applies=packed_applies(xd), kernel_applies=kernel_applies(xd))
    return dict(cpu_only,
                held_vs_masked=(held - masked).abs().max().item(),
                packed_vs_masked=(packed - masked).abs().max().item(),
                device_vs_cpu=(held.cpu() - on_cpu).abs().max().item(),
                skipped_unchanged=bool(torch.equal(held[~kd], xd[~kd])))


def check_backbone(dev: str) -> dict:
    model = DiT('b0', routing='full').eval()
    model.init_weights()
    img = torch.randn(2, 3, 224, 288)
    res = {}
    for routing, ratio in [('static', None), ('full', None), ('full', [0.3, 0.7]),
                           ('dynamic', None)]:
        model.routing, model.keep_ratio = routing, ratio
        outs, flops = [], []
        for device in ('cpu', dev):
            model.to(device)
            with torch.no_grad():
                outs.append([t.cpu() for t in model(img.to(device))])
            flops.append(model.flops()['real'])
        res[f'{routing}_{ratio}'] = dict(
            max_abs=max((a - b).abs().max().item() for a, b in zip(*outs)),
            flops_cpu=flops[0], flops_device=flops[1])
    return res


def check_train_step(dev: str) -> dict:
    res = {}
    for sparse in (False, True):
        model = DiT('b0', routing='dynamic', sparse_training=sparse).to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), 1e-4)
        feats = model(torch.randn(2, 3, 256, 256, device=dev))
        loss = sum(f.float().mean() for f in feats) + model.budget_loss(1.0)
        loss.backward()
        opt.step()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        res[f'sparse_training={sparse}'] = dict(
            loss=loss.item(), finite=bool(all(torch.isfinite(g).all() for g in grads)))
    return res


def _ratios(r: float, batch: int) -> List[float]:
    spread = 0.9 * min(r, 1 - r)
    return [r + spread * (2 * i / (batch - 1) - 1) for i in range(batch)]


def time_b2(dev: str, batch: int = 4, size: int = 512, rounds: int = 5,
            warmup: int = 3) -> Dict[str, float]:
    model = DiT('b2', routing='full').eval().to(dev)
    model.init_weights()
    x = torch.randn(batch, 3, size, size, device=dev)

    def variant(routing: str, ratio,
                dense_above: float = blocks.DENSE_ABOVE_ACCELERATOR) -> Callable[[], None]:
        def run() -> None:
            model.routing, model.keep_ratio = routing, ratio
            for mod in model.modules():
                if isinstance(mod, RoutedStage):
                    mod.dense_above_accelerator = dense_above
            with torch.no_grad():
                model(x)
        return run
    variants = {'static': variant('static', None), 'r1.0': variant('full', None)}
    for r in (0.75, 0.5, 0.25):
        ratios = _ratios(r, batch) if batch > 1 else r
        variants[f'r{r}_dense_route'] = variant('full', ratios, 0.0)
        variants[f'r{r}_packed'] = variant('full', ratios, 1.0)
        variants[f'r{r}_default'] = variant('full', ratios)  # the modules' defaults
    samples: Dict[str, List[float]] = {k: [] for k in variants}
    for i in range(warmup + rounds):
        for k, fn in variants.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            if i >= warmup:
                samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default=os.environ.get('OUT', '/tmp/out'))
    parser.add_argument('--timings', nargs='+', default=['4x512'], metavar='BATCHxSIZE',
                        help='inputs at which DiT-b2 is timed (default: 4x512)')
    args = parser.parse_args()
    try:
        timings = [tuple(int(v) for v in t.lower().split('x')) for t in args.timings]
        if not all(len(t) == 2 and t[0] > 0 and t[1] >= 32 for t in timings):
            raise ValueError
    except ValueError:
        parser.error(f'--timings takes BATCHxSIZE with SIZE >= 32, e.g. 4x512; got {args.timings}')
    if not torch.cuda.is_available():
        sys.exit('check_cuda: no CUDA device here')
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    res = dict(torch=torch.__version__, device=torch.cuda.get_device_name(0))
    checks = [('stage', check_stage), ('backbone', check_backbone),
              ('train_step', check_train_step)]
    checks += [(f'b2_{size}_batch{batch}_ms', partial(time_b2, batch=batch, size=size))
               for batch, size in timings]
    for name, fn in checks:
        res[name] = fn('cuda')
        print(name, json.dumps(res[name], indent=1), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'check_cuda.json'), 'w') as f:
        json.dump(res, f, indent=1)


if __name__ == '__main__':
    main()
