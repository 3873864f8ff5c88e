"""The same operators in two training steps: per-call time by operator and input shape.

    python benchmarks/profile_train_ops.py [--arch b2] [--input 512x512x2]
                                           [--variants static full] [--rounds 2]
                                           [--allocator keep|system] [--top 25]
                                           [--out benchmarks/profile_train_ops.json]

``bench_train.py`` times whole steps; this tells whether a slower step runs
*more* operators or runs the *same* operators slower. For each variant (the
names of ``bench_train.py``; the first is the baseline) it runs two warm-up
steps, then ``--rounds`` steps under ``torch.profiler`` with input shapes
recorded, and keeps each operator's self CPU time per step, keyed by name
and input shapes. The report:

* per variant: the profiled self time per step, and the same step *at the
  baseline's per-call times*: every operator call of the variant costed at
  what the same operator on the same shapes took per call in the baseline
  (operators the baseline does not run keep their own time). The gap between
  the two is the time lost to the same work running slower;
* the ``--top`` operators of the last variant by time per step: per-call
  milliseconds in the baseline and in the variant, their ratio, and calls.

**Caveat, measured:** the profiler's per-operator attributions did not
survive a wall-clock check. It put 555 ms per step on ``aten::gelu_backward``
in the full-grid step and 120 ms in the masked step on the same shapes, while
the same op timed with ``perf_counter`` inside the step took 3-7 ms per call,
and wrapping it did not change the step time (``docs/benchmarks.md``,
"Training time (CPU)"). Use
the report for which operators a step runs and how often; time whole steps
or nodes with ``bench_train.py``.

Both variants live in one process, under one allocator mode (``keep``:
:func:`dit_mm.engine.runtime.keep_freed_memory`, as ``tools/train.py`` sets
on the CPU). Nothing here is asserted by the tests but the shape of the
report; the numbers are for an idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_train  # noqa: E402

Key = Tuple[str, str]


def profile_steps(name: str, shape: Tuple[int, int, int], rounds: int
                  ) -> Dict[Key, Dict[str, float]]:
    """``{(op, shapes): {'ms': self ms per step, 'calls': calls per step}}``."""
    from torch.profiler import ProfilerActivity, profile
    h, w, b = shape
    model, gated = bench_train.build_variant(name, (h, w))
    x = torch.randn(b, 3, h, w)
    step = bench_train.step_fn(model, gated, x)
    step()
    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(rounds):
            step()
    ops = {}
    for e in prof.key_averages(group_by_input_shape=True):
        if e.self_cpu_time_total <= 0:
            continue
        ops[(e.key, str(e.input_shapes))] = dict(ms=e.self_cpu_time_total / 1e3 / rounds,
                                                 calls=e.count / rounds)
    return ops


def compare(base: Dict[Key, Dict[str, float]], other: Dict[Key, Dict[str, float]],
            top: int) -> dict:
    """Step totals of ``other`` as profiled and at ``base``'s per-call times,
    and its ``top`` operators side by side with ``base``'s."""
    at_base = 0.0
    for key, op in other.items():
        ref = base.get(key)
        at_base += ref['ms'] / ref['calls'] * op['calls'] if ref and ref['calls'] else op['ms']
    rows = []
    for key, op in sorted(other.items(), key=lambda kv: -kv[1]['ms'])[:top]:
        ref = base.get(key)
        per_call = op['ms'] / op['calls']
        ref_call = ref['ms'] / ref['calls'] if ref else None
        rows.append(dict(op=key[0], shapes=key[1], ms_per_step=op['ms'], calls=op['calls'],
                         ms_per_call=per_call, base_ms_per_call=ref_call,
                         base_calls=ref['calls'] if ref else 0,
                         slowdown=per_call / ref_call if ref_call else None))
    return dict(total_ms=sum(op['ms'] for op in other.values()), at_base_per_call_ms=at_base,
                top=rows)


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', default='b2')
    parser.add_argument('--input', type=bench_train._shape, default=(512, 512, 2))
    parser.add_argument('--variants', nargs='+', choices=bench_train.VARIANTS,
                        default=['static', 'full'])
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--allocator', choices=bench_train.ALLOCATORS, default='keep')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--top', type=int, default=25)
    parser.add_argument('--out', default='benchmarks/profile_train_ops.json')
    args = parser.parse_args(argv)
    if len(args.variants) < 2:
        parser.error('--variants: a baseline and at least one variant to compare with it')
    if args.rounds < 1:
        parser.error('--rounds must be >= 1')
    if args.allocator == 'keep':
        from dit_mm.engine.runtime import keep_freed_memory
        if not keep_freed_memory():
            parser.error('--allocator keep needs glibc; use --allocator system')
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bench_train.ARCH = args.arch
    profiles = {}
    for k, name in enumerate(args.variants):
        print(f'[{k + 1}/{len(args.variants)}] profiling {name}', flush=True)
        profiles[name] = profile_steps(name, args.input, args.rounds)
    base_name = args.variants[0]
    base = profiles[base_name]
    res = dict(arch=args.arch, input=list(args.input), rounds=args.rounds,
               allocator=args.allocator, baseline=base_name,
               machine=dict(platform=platform.platform(), threads=args.threads,
                            cpu=bench_train._cpu_name(), torch=torch.__version__),
               base_total_ms=sum(op['ms'] for op in base.values()),
               variants={n: compare(base, profiles[n], args.top) for n in args.variants[1:]})
    with open(args.out, 'w') as f:
        json.dump(res, f, indent=2)
    h, w, b = args.input
    print(f'\n### Self CPU time per step, {h}x{w} batch {b}, {args.arch}, allocator '
          f'{args.allocator} (both threads summed)')
    print(f'* {base_name}: {res["base_total_ms"] / 1e3:.2f} s')
    for n, v in res['variants'].items():
        print(f'* {n}: {v["total_ms"] / 1e3:.2f} s as profiled, '
              f'{v["at_base_per_call_ms"] / 1e3:.2f} s at {base_name}\'s per-call times')
    last = args.variants[-1]
    print(f'\n### Top operators of {last} against {base_name} (ms per call)')
    print(f'| op | input shapes | {last} ms/step | calls | {last} | {base_name} | ratio |')
    print('|---|---|---|---|---|---|---|')
    for r in res['variants'][last]['top']:
        ref = f"{r['base_ms_per_call']:.1f}" if r['base_ms_per_call'] else '-'
        ratio = f"{r['slowdown']:.2f}" if r['slowdown'] else '-'
        print(f"| {r['op']} | {r['shapes'][:60]} | {r['ms_per_step']:.0f} | {r['calls']:.0f} | "
              f"{r['ms_per_call']:.1f} | {ref} | {ratio} |")
    print(f'\nwritten: {args.out}')
    return res


if __name__ == '__main__':
    main()
