"""Training steps with and without the fused depthwise-conv + GELU kernel,
interleaved in one process.

    python benchmarks/bench_fused_train.py [--inputs 512x512x2 800x1344x1]
                                           [--rounds 3] [--variants static full masked sparse_mu086]
                                           [--out FILE]

(``FILE`` defaults to ``benchmarks/results/train-fused-ab-cpu-<family>-torch<version>.json``.)

Each variant of ``bench_train.py`` (same models, same step) runs twice per
round: once with :data:`dit_mm.accel.cpu.sparse_ops.FUSED_TRAINING` on (the
MLPs' conv + GELU as one C++ autograd function) and once with it off (the
conv, then PyTorch's GELU: oneDNN on the dense paths, the sparse conv kernel
in sparse training). Step times are medians over ``--rounds`` rounds after one
warm-up round, under the ``keep`` allocator mode that ``tools/train.py`` sets
on the CPU. Printed and written: seconds per step, the fused / unfused ratio
per variant, and each variant's ratio to DiT static under both settings
(the training-cost issue's targets are ratios to static).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import dit_mm  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_train  # noqa: E402
from bench_backbone import default_out, interleaved  # noqa: E402

from dit_mm.accel.cpu import sparse_ops  # noqa: E402
from dit_mm.engine.runtime import keep_freed_memory  # noqa: E402


def with_fused(step: Callable[[], None], on: bool) -> Callable[[], None]:
    """``step`` with the fused training kernel on or off (restored after)."""
    def run() -> None:
        before = sparse_ops.FUSED_TRAINING
        sparse_ops.FUSED_TRAINING = on
        try:
            step()
        finally:
            sparse_ops.FUSED_TRAINING = before
    return run


def bench(shape, variants: List[str], rounds: int) -> dict:
    h, w, b = shape
    x = torch.randn(b, 3, h, w)
    steps: Dict[str, Callable[[], None]] = {}
    for name in variants:
        model, gated = bench_train.build_variant(name, (h, w))
        step = bench_train.step_fn(model, gated, x)
        steps[f'{name}/fused'] = with_fused(step, True)
        steps[f'{name}/unfused'] = with_fused(step, False)
    times = interleaved(steps, rounds, warmup=1)
    rows = {}
    for name in variants:
        fused, unfused = times[f'{name}/fused'], times[f'{name}/unfused']
        rows[name] = dict(fused_s=fused, unfused_s=unfused, fused_over_unfused=fused / unfused)
        if 'static' in variants:
            rows[name]['over_static_fused'] = fused / times['static/fused']
            rows[name]['over_static_unfused'] = unfused / times['static/unfused']
    print(f'{h}x{w} batch {b}:', flush=True)
    for name, r in rows.items():
        extra = (f', x static {r["over_static_fused"]:.2f} (unfused {r["over_static_unfused"]:.2f})'
                 if 'over_static_fused' in r else '')
        print(f'  {name}: fused {r["fused_s"]:.2f} s, unfused {r["unfused_s"]:.2f} s, '
              f'ratio {r["fused_over_unfused"]:.3f}{extra}', flush=True)
    return dict(input=[h, w], batch=b, rounds=rounds, variants=rows)


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--inputs', nargs='+', type=bench_train._shape,
                        default=[(512, 512, 2), (800, 1344, 1)], metavar='HxWxBATCH')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--variants', nargs='+', choices=bench_train.VARIANTS,
                        default=['static', 'full', 'masked', 'sparse_mu086'])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--arch', default=bench_train.ARCH, help="DiT arch (default 'b2')")
    parser.add_argument('--out', default=default_out('train-fused-ab'))
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error('--rounds must be at least 1')
    if not sparse_ops.extension_available():
        parser.error('the C++ extension is unavailable here: there is no fused kernel to compare')
    bench_train.ARCH = args.arch
    allocator = 'keep' if keep_freed_memory() else 'system'  # before any step
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    res = dict(cpu=bench_train._cpu_name(), arch=args.arch, threads=args.threads,
               allocator=allocator,
               runs=[bench(s, args.variants, args.rounds) for s in args.inputs])
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + '\n')
        print(f'wrote {args.out}')
    return res


if __name__ == '__main__':
    main()
