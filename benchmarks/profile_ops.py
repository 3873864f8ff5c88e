"""Where a DiT forward's time goes, by kind of op, at several keep ratios.

    python benchmarks/profile_ops.py [--arch b2] [--size 224] [--batch 1]
                                     [--ratios 1 0.5 0.25 0.01] [--rounds 5]
                                     [--out benchmarks/profile_ops.json]

For each keep ratio r (``routing='full'``, per-image ratios with mean r at
batch > 1, as in ``bench_backbone.py``) it runs ``--rounds`` forwards under
``torch.profiler`` and sums the operators' self CPU time into kinds: GEMMs,
convolutions, attention, the sparse depthwise conv, LayerNorm, the gates
(everything inside the ``dit::gate`` scopes) and the rest. ``outside ops`` is
the profiled wall time not spent in any operator (the interpreter, and the
profiler's own cost). Next to it: the unprofiled wall time (median of as
many forwards) and each kind's share of r = max(ratios).

The r -> 0 column is the *floor*: what a forward costs with (almost) no token
kept. Latency ratios follow roughly ``floor + r * (1 - floor)``, so this is
the tool to find out why latency and FLOPs ratios disagree. glibc is told to
keep freed memory (``dit_mm.engine.runtime.keep_freed_memory``), as in the
benchmark's ``keep`` rows. Nothing here is asserted by the tests but the
shape of the report.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from bench_backbone import DiTView, per_image_ratios  # noqa: E402

#: Operator kinds, first match wins (profiler keys, by substring).
KINDS = (
    ('gemm', ('_linear_pointwise', 'aten::addmm', 'aten::mm', 'aten::bmm', 'aten::matmul')),
    ('conv', ('_convolution_pointwise', 'mkldnn_convolution', 'aten::_convolution',
              'aten::convolution', 'aten::conv2d', 'slow_conv')),
    ('attention', ('scaled_dot_product',)),
    ('depthwise_conv', ('dit::sparse_dwconv', 'dit::dwconv')),
    ('layer_norm', ('layer_norm',)),
)
ORDER = ('gemm', 'conv', 'attention', 'depthwise_conv', 'layer_norm', 'gates', 'other ops',
         'outside ops')


def kind_of(key: str) -> str:
    for kind, needles in KINDS:
        if any(n in key for n in needles):
            return kind
    return 'other ops'


def _in_gate(event) -> bool:
    while event is not None:
        if event.name == 'dit::gate':
            return True
        event = event.cpu_parent
    return False


def profile_ratio(model, x: torch.Tensor, ratio, rounds: int) -> Dict[str, float]:
    """Seconds per forward by kind (see the module docstring), profiled."""
    from torch.profiler import ProfilerActivity, profile
    run = DiTView(model, 'full', ratio).runner(x)
    for _ in range(2):
        run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(rounds):
            run()
        wall = time.perf_counter() - t0
    by_kind = dict.fromkeys(ORDER, 0.0)
    for ev in prof.events():
        kind = 'gates' if _in_gate(ev) else kind_of(ev.name)
        by_kind[kind] += ev.self_cpu_time_total / 1e6
    in_ops = sum(by_kind.values())
    by_kind['outside ops'] = max(wall - in_ops, 0.0)
    return {k: v / rounds for k, v in by_kind.items()}


def wall_time(model, x: torch.Tensor, ratio, rounds: int) -> float:
    """Median seconds per forward without the profiler."""
    run = DiTView(model, 'full', ratio).runner(x)
    run()
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def print_report(res: dict) -> None:
    ratios = [row['keep_ratio'] for row in res['rows']]
    print(f"\nDiT-{res['arch']} full grid, {res['size']}x{res['size']}, batch {res['batch']}, "
          f"{res['threads']} threads: ms per forward by kind (profiled)")
    print(f"{'kind':<16}" + ''.join(f'{f"r={r:g}":>10}' for r in ratios))
    for kind in ORDER:
        print(f'{kind:<16}' + ''.join(f"{row['ms'][kind]:>10.2f}" for row in res['rows']))
    print(f"{'total':<16}" + ''.join(f"{row['profiled_ms']:>10.2f}" for row in res['rows']))
    print(f"{'unprofiled':<16}" + ''.join(f"{row['wall_ms']:>10.2f}" for row in res['rows']))
    print(f"{'latency ratio':<16}" + ''.join(f"{row['latency_ratio']:>10.3f}"
                                             for row in res['rows']))
    print(f"{'FLOPs ratio':<16}" + ''.join(f"{row['real_flops_ratio']:>10.3f}"
                                           for row in res['rows']))


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', default='b2')
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--ratios', type=float, nargs='+', default=[1.0, 0.5, 0.25, 0.01])
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--out', default='benchmarks/profile_ops.json')
    args = parser.parse_args(argv)
    if not all(0.0 < r <= 1.0 for r in args.ratios):
        parser.error(f'--ratios must lie in (0, 1], got {args.ratios}')
    if args.rounds < 1:
        parser.error('--rounds must be at least 1')
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from dit_mm import DiT
    from dit_mm.engine.runtime import keep_freed_memory
    keep_freed_memory()
    model = DiT(args.arch, routing='full').eval()
    model.init_weights()
    x = torch.randn(args.batch, 3, args.size, args.size)
    ratios = sorted(args.ratios, reverse=True)
    rows = []
    for r in ratios:
        ratio = per_image_ratios(r, args.batch) if args.batch > 1 else r
        print(f'r = {r:g}', flush=True)
        by_kind = profile_ratio(model, x, ratio, args.rounds)
        wall = wall_time(model, x, ratio, args.rounds)
        rows.append(dict(keep_ratio=r, ms={k: v * 1e3 for k, v in by_kind.items()},
                         profiled_ms=sum(by_kind.values()) * 1e3, wall_ms=wall * 1e3,
                         real_flops=model.flops()['real']))
    top = rows[0]
    for row in rows:
        row['latency_ratio'] = row['wall_ms'] / top['wall_ms']
        row['real_flops_ratio'] = row['real_flops'] / top['real_flops']
        row['share_of_top'] = {k: v / top['profiled_ms'] for k, v in row['ms'].items()}
    res = dict(arch=args.arch, size=args.size, batch=args.batch, threads=args.threads,
               rounds=args.rounds, torch=torch.__version__, rows=rows)
    with open(args.out, 'w') as f:
        json.dump(res, f, indent=2)
    print_report(res)
    print(f'\nwritten: {args.out}')
    return res


if __name__ == '__main__':
    main()
