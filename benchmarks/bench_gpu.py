"""Latency of DiT's static-shape routing against mmdet's PVTv2, on a GPU.

    python benchmarks/bench_gpu.py [--device cuda|cpu] [--quick] [--out FILE]

Compares backbones (no neck or heads), PVTv2 init, random gates:

* ``pvtv2``: mmdet's ``PyramidVisionTransformerV2`` (b2), the baseline;
* ``dit_mu0.86``: DiT-b2, static-shape routing at a capacity whose graph
  costs 0.86 x C_base (``uniform_keep_for_budget``: a trained checkpoint's
  calibrated capacities cost the same by construction, so the timing does
  not need one);
* ``dit_r0.5``: DiT-b2, static-shape routing, every gated node on half of
  its tokens;
* ``dit_full``: DiT-b2's whole grid, every token (the reference of the r = 0.5
  target, at the largest case only).

in float32 and bfloat16, at 512x512 batch 1 and 4, 800x1333 batch 2 and
1024x1024 batch 8, in three modes: ``eager``; ``cudagraph`` (the eager
forward captured once in a CUDA graph and replayed, no compiler); and
``compile`` (``torch.compile(mode='reduce-overhead')``: Inductor plus CUDA
graphs), which costs a compilation per model and shape, so by default only in
bfloat16 at the cases in ``--compile-cases`` and while the run is under
``--time-limit`` seconds. Each measurement is a median over interleaved rounds
(every model once per round), synchronised.

Targets (issue 31): ``dit_mu0.86`` at most 1.0 x ``pvtv2`` at every case;
``dit_r0.5`` / ``dit_full`` at most 1.15 x their FLOPs ratio at 1024x1024
batch 8. Writes ``benchmarks/results/gpu-<device>-torch<version>.json``.

``--device cpu --quick`` checks the script on a CPU (DiT-b0 and PVTv2-b0 at
128x128, eager and the captured forward skipped, in a minute or so).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from benchmarks.machine import machine, write_result  # noqa: E402
from dit_mm import DiT  # noqa: E402
from dit_mm.models.cost_model import uniform_keep_for_budget  # noqa: E402

CASES = ((512, 512, 1), (512, 512, 4), (800, 1333, 2), (1024, 1024, 8))
PVT_ARGS = dict(b0=dict(embed_dims=32, num_layers=[2, 2, 2, 2]),
                b2=dict(embed_dims=64, num_layers=[3, 4, 6, 3]))


def build_models(arch: str, device: str) -> Dict[str, torch.nn.Module]:
    from mmdet.models.backbones import PyramidVisionTransformerV2
    torch.manual_seed(0)
    models = {'pvtv2': PyramidVisionTransformerV2(**PVT_ARGS[arch])}
    base = DiT(arch=arch, routing='dynamic')
    base.init_weights()
    models['dit_mu0.86'] = DiT(arch=arch, static_shapes=True)
    models['dit_r0.5'] = DiT(arch=arch, static_shapes=True, keep_ratio=0.5)
    models['dit_full'] = DiT(arch=arch, routing='full')
    for k in ('dit_mu0.86', 'dit_r0.5', 'dit_full'):
        models[k].load_state_dict(base.state_dict())
    return {k: m.eval().to(device) for k, m in models.items()}


def flops_ratio(model: torch.nn.Module, size: Tuple[int, int]) -> float | None:
    """Analytic backbone FLOPs / C_base of a DiT variant (None for PVTv2)."""
    if not isinstance(model, DiT):
        return None
    if model.routing == 'full':
        cost = model.grid_cost(size)
        return cost.full / cost.static
    c = model.static_shape_cost(size)
    return c['total'] / c['static']


def _sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def runner(model: torch.nn.Module, x: torch.Tensor, mode: str) -> Callable[[], object]:
    """A no-argument callable that runs one forward in ``mode``."""
    if mode == 'eager':
        return lambda: model(x)
    if mode == 'compile':
        compiled = torch.compile(model, mode='reduce-overhead', fullgraph=True)
        return lambda: compiled(x)
    if mode == 'cudagraph':
        static_x = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up outside the capture (allocations, cuBLAS)
                model(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(static_x)
        return graph.replay
    raise ValueError(mode)


def time_interleaved(fns: Dict[str, Callable], device: str, rounds: int,
                     warmup: int = 3) -> Dict[str, float]:
    """Median ms of each callable, every callable once per round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--quick', action='store_true', help='b0 at 128x128 batch 1 (a smoke run)')
    p.add_argument('--rounds', type=int, default=10)
    p.add_argument('--modes', nargs='+', default=None,
                   help='eager cudagraph compile (default: all three on CUDA, eager on CPU)')
    p.add_argument('--compile-cases', nargs='*', default=['1024x1024x8', '512x512x4'],
                   help='HxWxB cases compiled (bfloat16 only); empty: every case')
    p.add_argument('--time-limit', type=float, default=270.0,
                   help='skip further compilations once the run has taken this long (s)')
    p.add_argument('--out')
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    device = args.device
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise SystemExit('--device cuda: no GPU here; use --device cpu --quick to check the '
                         'script')
    arch = 'b0' if args.quick else 'b2'
    cases = ((128, 128, 1),) if args.quick else CASES
    modes = args.modes or (['eager', 'cudagraph', 'compile'] if device.startswith('cuda')
                           else ['eager'])
    if 'cudagraph' in modes and not device.startswith('cuda'):
        raise SystemExit('cudagraph mode needs --device cuda')
    dtypes = {'float32': torch.float32, 'bfloat16': torch.bfloat16}
    models = build_models(arch, device)
    res: dict = dict(benchmark='gpu', machine=machine(device), arch=arch, modes=modes,
                     rounds=args.rounds, results=[])
    for (H, W, B) in cases:
        size = (H, W)
        mu = models['dit_mu0.86']
        mu.capacity = max(1e-3, uniform_keep_for_budget(mu.grid_cost(size), 0.86))
        names = [k for k in models if k != 'dit_full' or (H, W, B) == cases[-1]]
        for dname, dtype in dtypes.items():
            x = torch.randn(B, 3, H, W, device=device)  # bfloat16 runs under autocast
            for mode in modes:
                case = f'{H}x{W}x{B}'
                if mode == 'compile' and (dname != 'bfloat16' or (
                        args.compile_cases and case not in args.compile_cases)):
                    continue
                row = dict(size=[H, W], batch=B, dtype=dname, mode=mode)
                if mode == 'compile' and time.perf_counter() - t_start > args.time_limit:
                    res['results'].append(dict(row, skipped='time limit'))
                    continue
                torch._dynamo.reset()
                try:
                    with torch.no_grad(), torch.autocast(device.split(':')[0], dtype=dtype,
                                                         enabled=dtype != torch.float32,
                                                         cache_enabled=False):
                        fns = {k: runner(models[k], x, mode) for k in names}
                        ms = time_interleaved(fns, device, args.rounds)
                except Exception as e:  # noqa: BLE001  (a mode that fails is a result)
                    res['results'].append(dict(row, error=f'{type(e).__name__}: {e}'[:500]))
                    print(f'{case} {dname} {mode}: failed: {e}', flush=True)
                    continue
                ratios = {k: flops_ratio(models[k], size) for k in names}
                row.update(ms=ms, flops_over_c_base=ratios,
                           mu_vs_pvtv2=round(ms['dit_mu0.86'] / ms['pvtv2'], 3))
                if 'dit_full' in ms:
                    lat = ms['dit_r0.5'] / ms['dit_full']
                    flops = ratios['dit_r0.5'] / ratios['dit_full']
                    row.update(r05_vs_full=round(lat, 3), r05_flops_vs_full=round(flops, 3),
                               r05_latency_over_flops=round(lat / flops, 3))
                res['results'].append(row)
                print(f'{case} {dname} {mode}: ' + ', '.join(f'{k} {v:.2f} ms'
                                                          for k, v in ms.items())
                      + f' | mu0.86 / pvtv2 {row["mu_vs_pvtv2"]:.3f}', flush=True)
    res['seconds'] = round(time.perf_counter() - t_start, 1)
    dev = device.split(':')[0]
    write_result(res, args.out, f'gpu-{dev}{"-quick" if args.quick else ""}'
                                f'-torch{torch.__version__.split("+")[0]}.json')
    return res


if __name__ == '__main__':
    main()
