"""Deployed latency of DiT's static-shape form in onnxruntime (CPU),
against the ONNX export of DiT static (= PVTv2) and of the masked dense form.

    python benchmarks/bench_export.py [--arch b2] [--size 512 512] [--batches 1 4]
        [--budgets 0.5 0.8 1.0] [--repeats 5] [--threads 2] [--out FILE]

For every budget B (x C_base) the capacity is the uniform fraction of every
gated node's tokens at which the static-shape graph costs B x C_base
(``cost_model.uniform_keep_for_budget``: every column edge computed, every
gate evaluated), so the result does not depend on a trained checkpoint: the
graph's cost is fixed by its capacities, whatever the weights decide. The
model is DiT with dynamic routing (PVTv2 init, random gates).

Reported per batch: the median latency of each graph (interleaved rounds,
one session each, nothing else running), its analytic FLOPs over C_base,
and ``latency ratio / FLOPs ratio`` against the static export: the issue's
target is at most 1.15. Writes ``benchmarks/results/export-onnxruntime-cpu-
torch<version>.json`` unless ``--out`` says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from benchmarks.machine import machine, write_result  # noqa: E402
from dit_mm import DiT  # noqa: E402
from dit_mm.models import slots  # noqa: E402
from dit_mm.models.cost_model import uniform_keep_for_budget  # noqa: E402


def _export(model: DiT, x: torch.Tensor, path: str) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17,
                          input_names=['inputs'])


class _AotiSession:
    """An AOTInductor package behind onnxruntime's ``run(None, feeds)``."""

    def __init__(self, path: str) -> None:
        self.fn = torch._inductor.aoti_load_package(path)

    def run(self, _outputs, feeds: dict) -> list:
        with torch.no_grad():
            out = self.fn(torch.from_numpy(feeds['inputs']))
        return [o.numpy() for o in out]


def _compile_aoti(model: DiT, x: torch.Tensor, path: str) -> None:
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        torch._inductor.aoti_compile_and_package(program, package_path=path)


def build_graphs(arch: str, size: tuple, budgets: list, dense_keep: float, seed: int = 0,
                 dwconvs: tuple = ('taps',)) -> dict:
    """name -> (model, FLOPs / C_base, capacity, depthwise mode) of every
    graph to time (``dwconvs``: :data:`dit_mm.models.slots.DWCONV` modes)."""
    torch.manual_seed(seed)
    static = DiT(arch=arch, routing='static').eval()
    static.init_weights()
    graphs = {'static': (static, 1.0, None, None)}
    routed = DiT(arch=arch, routing='dynamic').eval()
    routed.load_state_dict(static.state_dict(), strict=False)
    cost = routed.grid_cost(size)
    for b in budgets:
        for mode in dwconvs:
            m = DiT(arch=arch, routing='dynamic', static_shapes=True).eval()
            m.load_state_dict(routed.state_dict())
            m.capacity = max(1e-3, uniform_keep_for_budget(cost, b))
            slots.DWCONV = mode
            c = m.static_shape_cost(size)
            name = f'budget_{b:g}' + (f'_{mode}' if len(dwconvs) > 1 else '')
            graphs[name] = (m, c['total'] / c['static'], float(m.capacity), mode)
    m = DiT(arch=arch, routing='dynamic', keep_ratio=dense_keep).eval()
    m.load_state_dict(routed.state_dict())
    graphs[f'dense_keep_{dense_keep:g}'] = (m, cost.full / cost.static, dense_keep, None)
    return graphs


def time_sessions(sessions: dict, feeds: dict, repeats: int) -> dict:
    """Interleaved rounds: every graph once per round; medians in ms."""
    times = {k: [] for k in sessions}
    for s in sessions.values():  # warm-up
        s.run(None, feeds)
    for _ in range(repeats):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: dict(median_ms=statistics.median(v), all_ms=[round(t, 2) for t in v])
            for k, v in times.items()}


def profile_ops(path: str, opts, feeds: dict, runs: int = 3) -> dict:
    """Mean ms per run of each ONNX op type (onnxruntime's profiler)."""
    import collections

    import onnxruntime as ort
    prof = ort.SessionOptions()
    prof.intra_op_num_threads = opts.intra_op_num_threads
    prof.inter_op_num_threads = 1
    prof.enable_profiling = True
    prof.profile_file_prefix = os.path.join(os.path.dirname(path), 'ort_profile')  # a temp dir
    sess = ort.InferenceSession(path, prof, providers=['CPUExecutionProvider'])
    sess.run(None, feeds)  # warm-up (its events are counted too: one run in runs + 1)
    for _ in range(runs):
        sess.run(None, feeds)
    trace = sess.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    os.remove(trace)
    by_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get('cat') == 'Node' and e['name'].endswith('_kernel_time'):
            by_op[e['args']['op_name']] += e['dur'] / 1e3 / (runs + 1)
    return {k: round(v, 1) for k, v in by_op.most_common()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--arch', default='b2')
    p.add_argument('--size', type=int, nargs=2, default=[512, 512])
    p.add_argument('--batches', type=int, nargs='+', default=[1, 4])
    p.add_argument('--budgets', type=float, nargs='+', default=[0.5, 0.8, 1.0])
    p.add_argument('--dense-keep', type=float, default=0.5,
                   help='keep ratio of the masked dense export shown for contrast')
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--dwconv', nargs='+', default=[slots.DWCONV], choices=['taps', 'map'],
                   help='depthwise-conv forms of the static-shape graphs (slots.DWCONV)')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--runtime', choices=['onnxruntime', 'aoti'], default='onnxruntime',
                   help='aoti: AOTInductor packages (torch.export, then '
                        'torch._inductor.aoti_compile_and_package) instead of ONNX')
    p.add_argument('--no-dense', action='store_true', help='skip the masked dense graph')
    p.add_argument('--profile', action='store_true',
                   help="also record onnxruntime's time per op type of every graph (one "
                        'profiled session each, after the timed rounds)')
    p.add_argument('--out')
    args = p.parse_args(argv)
    import onnxruntime as ort
    torch.set_num_threads(args.threads)
    aoti = args.runtime == 'aoti'
    size = tuple(args.size)
    graphs = build_graphs(args.arch, size, args.budgets, args.dense_keep,
                          dwconvs=tuple(args.dwconv))
    if args.no_dense:
        graphs = {k: v for k, v in graphs.items() if not k.startswith('dense')}
    res = dict(benchmark=f'export-{args.runtime}-cpu', machine=machine('cpu'), arch=args.arch,
               size=list(size), repeats=args.repeats, results={})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batches:
            x = torch.randn(batch, 3, *size)
            sessions, diffs, paths = {}, {}, {}
            for name, (model, _, _, mode) in graphs.items():
                path = os.path.join(tmp, f'{name}_b{batch}.{"pt2" if aoti else "onnx"}')
                slots.DWCONV = mode or slots.DWCONV
                paths[name] = path
                t0 = time.perf_counter()
                if aoti:
                    _compile_aoti(model, x, path)
                    sessions[name] = _AotiSession(path)
                else:
                    _export(model, x, path)
                    sessions[name] = ort.InferenceSession(path, opts,
                                                          providers=['CPUExecutionProvider'])
                with torch.no_grad():
                    want = model(x)
                got = sessions[name].run(None, {'inputs': x.numpy()})
                diffs[name] = max(float(np.abs(w.numpy() - g).max()) for w, g in zip(want, got))
                print(f'[export] {name} batch {batch}: {time.perf_counter() - t0:.1f} s, '
                      f'max diff {diffs[name]:.1e}', flush=True)
            timed = time_sessions(sessions, {'inputs': x.numpy()}, args.repeats)
            base = timed['static']['median_ms']
            rows = {}
            for name, (_, flops, cap, mode) in graphs.items():
                lat = timed[name]['median_ms'] / base
                rows[name] = dict(timed[name], latency_ratio=round(lat, 3),
                                  flops_ratio=round(flops, 3), capacity=cap, dwconv=mode,
                                  latency_over_flops=round(lat / flops, 3),
                                  max_diff=diffs[name])
                print(f'batch {batch} {name:>16}: {timed[name]["median_ms"]:8.1f} ms  '
                      f'latency {lat:.3f}  FLOPs {flops:.3f}  ratio {lat / flops:.3f}',
                      flush=True)
            if args.profile and not aoti:
                for name in sessions:
                    rows[name]['ms_by_op'] = profile_ops(paths[name], opts,
                                                         {'inputs': x.numpy()})
            res['results'][f'batch_{batch}'] = rows
    write_result(res, args.out,
                 f'export-{args.runtime}-cpu-torch{torch.__version__.split("+")[0]}.json')
    return res


if __name__ == '__main__':
    main()
