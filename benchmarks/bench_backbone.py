"""Wall-clock benchmark: DiT against PVTv2, skipped against dense, side by side.

    python benchmarks/bench_backbone.py [--out FILE] [--rounds 5]
                                        [--sizes 224 512] [--malloc system keep] [--quick]

(``FILE`` defaults to ``benchmarks/results/backbone-cpu-<family>-torch<version>.json``.)

Every figure is a median over ``--rounds`` interleaved rounds (each round times
every variant once, after two warm-up rounds), so drifts in machine load hit
all variants alike; every sample is kept in the JSON. It measures, in one run:

* static overhead (once per allocator mode, see
  :func:`bench_backbones_per_allocator`): mmdet ``PyramidVisionTransformerV2``-b2 against DiT-b2
  with ``routing='static'`` (same weights through the converter);
* skip efficiency: DiT-b2 ``routing='full'`` with ``keep_ratio`` 1.0, 0.75,
  0.5, 0.25 at batch 1 and at batch 4 with unequal per-image ratios whose mean
  is the ratio; next to it, the real-FLOPs ratio from ``backbone.flops()``,
  and r = 1.0 once more without the C++ stage program (Python blocks);
* gate/gather/scatter overhead at r = 1.0 and 0.5 with ``torch.profiler``
  (the ``dit::*`` scopes), as a share of backbone time;
* a whole Mask R-CNN forward (eval) with DiT-b2 against PVTv2-b2 at 512x512;
* a training step (forward, backward, AdamW step) of DiT-b2 with the budget
  loss at mu = 1 (gates set to spend PVTv2's cost) against PVTv2-b2, same
  batch and input, with the default dense masked path and with
  ``sparse_training=True``;
* peak memory of each variant (RSS growth during a forward, fresh process each).

It writes every figure to JSON and prints a table. Tests never assert on time.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

RATIOS = (1.0, 0.75, 0.5, 0.25)


def default_out(benchmark: str) -> str:
    """The default ``--out``: ``benchmarks/results/<benchmark>-cpu-<family>-torch<version>.json``
    (family ``epyc`` or ``xeon``, left out for other CPUs)."""
    try:
        with open('/proc/cpuinfo') as f:
            cpu = f.read().lower()
    except OSError:
        cpu = ''
    family = next((f'-{t}' for t in ('epyc', 'xeon') if t in cpu), '')
    return f'benchmarks/results/{benchmark}-cpu{family}-torch{torch.__version__.split("+")[0]}.json'


def per_image_ratios(r: float, batch: int) -> List[float]:
    """``batch`` unequal keep ratios in (0, 1] with mean ``r``."""
    if batch == 1 or r >= 1.0:
        return [r] * batch
    spread = min(r, 1.0 - r) * 0.9
    offsets = torch.linspace(-1, 1, batch).tolist()
    return [r + spread * o for o in offsets]


def build_pair(arch: str = 'b2'):
    """mmdet PVTv2 and a DiT with the same weights (through the converter)."""
    from mmdet.models.backbones.pvt import PyramidVisionTransformerV2

    from dit_mm import DiT
    from dit_mm.models.grid import ARCH_SETTINGS
    from dit_mm.models.weights import convert_pvt_state_dict, load_converted
    a = ARCH_SETTINGS[arch]
    pvt = PyramidVisionTransformerV2(embed_dims=a['embed_dims'][0], num_layers=list(a['depths']),
                                     num_heads=list(a['num_heads']),
                                     mlp_ratios=list(a['mlp_ratios'])).eval()
    pvt.init_weights()
    dit = DiT(arch, routing='static', embed_norm_eps=1e-6).eval()
    dit.init_weights()
    state, _ = convert_pvt_state_dict(pvt.state_dict(), dit)
    load_converted(dit, state)
    return pvt, dit


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(variants: Dict[str, Callable[[], object]], rounds: int,
                warmup: int = 2, spread: Optional[Dict[str, List[float]]] = None
                ) -> Dict[str, float]:
    """Median seconds per variant over interleaved rounds, after ``warmup``
    interleaved rounds (the allocator and oneDNN settle over the first
    calls: at 224², batch 1, the first three full-grid forwards took ~380 ms,
    later ones ~200 ms). ``spread`` receives every variant's samples."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    samples: Dict[str, List[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            samples[k].append(timed(fn))
    if spread is not None:
        spread.update(samples)
    return {k: statistics.median(v) for k, v in samples.items()}


def _no_grad(model, x):
    def run():
        with torch.no_grad():
            return model(x)
    return run


def bench_backbones(sizes: Sequence[int], batches: Sequence[int], rounds: int) -> List[dict]:
    pvt, dit = build_pair('b2')
    rows = []
    for size in sizes:
        for batch in batches:
            x = torch.randn(batch, 3, size, size)
            variants = {'pvtv2_mmdet': _no_grad(pvt, x)}
            static = DiTView(dit, 'static', None)
            variants['dit_static'] = static.runner(x)
            views = {r: DiTView(dit, 'full', per_image_ratios(r, batch) if batch > 1 else r)
                     for r in RATIOS}
            for r, view in views.items():
                variants[f'dit_full_r{r}'] = view.runner(x)
            # the dense route without the C++ stage program: what r = 1 cost
            # before it (the Python blocks), for reference only
            variants['dit_full_r1.0_python'] = DiTView(dit, 'full', 1.0, native=False).runner(x)
            samples: Dict[str, List[float]] = {}
            times = interleaved(variants, rounds, spread=samples)
            flops = {r: view.real_flops(x) for r, view in views.items()}
            base_t, base_f = times['dit_full_r1.0'], flops[1.0]
            print(f'  backbones {size}x{size} batch {batch}: ' + ', '.join(
                f'{k} {v * 1e3:.0f} ms' for k, v in times.items()), flush=True)
            rows.append(dict(
                size=size, batch=batch, times_s=times, samples_s=samples,
                static_over_pvt=times['dit_static'] / times['pvtv2_mmdet'],
                python_dense_over_native=times['dit_full_r1.0_python'] / base_t,
                skip=[dict(keep_ratio=r, per_image=per_image_ratios(r, batch),
                           latency_ratio=times[f'dit_full_r{r}'] / base_t,
                           real_flops_ratio=flops[r] / base_f,
                           target=None if r > 0.5 else r + (0.10 if r == 0.5 else 0.15))
                      for r in RATIOS]))
    return rows


def _backbones_child(malloc: str, sizes: Sequence[int], batches: Sequence[int], rounds: int,
                     threads: int, queue) -> None:
    """:func:`bench_backbones` in a fresh process with glibc's default
    allocator (``system``) or with freed memory kept for reuse (``keep``)."""
    from dit_mm.engine.runtime import keep_freed_memory
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if malloc == 'keep' and not keep_freed_memory():
        queue.put(None)
        return
    rows = bench_backbones(sizes, batches, rounds)
    queue.put([dict(row, malloc=malloc) for row in rows])


def bench_backbones_per_allocator(modes: Sequence[str], sizes: Sequence[int],
                                  batches: Sequence[int], rounds: int, threads: int) -> List[dict]:
    """The backbone table once per allocator mode, each in its own process.

    glibc serves large blocks with fresh pages and returns freed heap tops to
    the kernel, so by default every forward page-faults its activations back
    in; that costs the dense grid (larger activations) more than the packed
    path. ``keep`` removes it (:func:`dit_mm.engine.runtime.keep_freed_memory`: no
    page faults per forward in any variant here), so its rows are the fair ones.
    """
    ctx = mp.get_context('spawn')
    rows: List[dict] = []
    for mode in modes:
        print(f'  allocator: {mode}', flush=True)
        q = ctx.Queue()
        p = ctx.Process(target=_backbones_child,
                        args=(mode, list(sizes), list(batches), rounds, threads, q))
        p.start()
        got = q.get()
        p.join()
        if got is None:
            print(f'  allocator mode {mode!r} unavailable here (not glibc); skipped')
            continue
        rows += got
    return rows


class DiTView:
    """Runs one DiT under a given routing/keep_ratio (shared weights)."""

    def __init__(self, model, routing: str, keep_ratio, native: bool = True) -> None:
        from dit_mm.models.blocks import RoutedStage
        self.model, self.routing, self.keep_ratio = model, routing, keep_ratio
        self.native = native  # the C++ stage program (dit_mm.accel.cpu.native_stage)
        self.stages = [m for m in model.modules() if isinstance(m, RoutedStage)]

    def _set(self):
        self.model.routing = self.routing
        self.model.keep_ratio = self.keep_ratio
        for stage in self.stages:
            stage.native = self.native

    def runner(self, x):
        def run():
            self._set()
            with torch.no_grad():
                return self.model(x)
        return run

    def real_flops(self, x) -> float:
        self.runner(x)()
        return self.model.flops()['real']


def profile_overhead(size: int, batch: int, ratio: float) -> dict:
    """Share of backbone time in the ``dit::gate/gather/scatter`` scopes."""
    from torch.profiler import ProfilerActivity, profile
    _, dit = build_pair('b2')
    view = DiTView(dit, 'full', per_image_ratios(ratio, batch) if batch > 1 else ratio)
    x = torch.randn(batch, 3, size, size)
    run = view.runner(x)
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = timed(run)
    scopes = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages()
              if e.key.startswith('dit::')}
    share = {k: v / t for k, v in scopes.items()}
    overhead = ('dit::gate', 'dit::gather', 'dit::scatter')  # dit::sparse_dwconv is compute
    return dict(size=size, batch=batch, keep_ratio=ratio, backbone_s=t, scope_s=scopes,
                share=share, total_share=sum(v for k, v in share.items() if k in overhead))


def _mask_rcnn(backbone: dict, in_channels: List[int]):
    import logging

    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    import os.path as osp

    import mmdet
    base = osp.join(osp.dirname(mmdet.__file__), '.mim/configs/mask_rcnn/'
                    'mask-rcnn_r50_fpn_1x_coco.py')
    cfg = Config.fromfile(base)
    cfg.model.backbone = backbone
    cfg.model.neck.in_channels = in_channels
    model = MODELS.build(cfg.model).eval()
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)  # init_weights logs every parameter at INFO
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)
    return model


def bench_mask_rcnn(size: int, rounds: int) -> dict:
    from mmdet.structures import DetDataSample
    pvt, dit = build_pair('b2')
    chans = [64, 128, 320, 512]
    det_pvt = _mask_rcnn(dict(type='PyramidVisionTransformerV2', embed_dims=64,
                              num_layers=[3, 4, 6, 3]), chans)
    det_pvt.backbone.load_state_dict(pvt.state_dict())
    det_dit = _mask_rcnn(dict(type='DiT', arch='b2', routing='dynamic', embed_norm_eps=1e-6),
                         chans)
    det_dit.backbone.load_state_dict(dit.state_dict())
    _open_budget_gates(det_dit.backbone)
    x = torch.randn(1, 3, size, size)
    meta = dict(img_shape=(size, size), ori_shape=(size, size), scale_factor=(1.0, 1.0),
                batch_input_shape=(size, size), pad_shape=(size, size))
    samples = [DetDataSample(metainfo=meta)]

    def run(model):
        def f():
            with torch.no_grad():
                return model.predict(x, samples)
        return f
    times = interleaved({'mask_rcnn_pvtv2_b2': run(det_pvt),
                         'mask_rcnn_dit_b2': run(det_dit)}, rounds)
    with torch.no_grad():
        det_dit.predict(x, samples)
    flops = det_dit.backbone.flops()
    return dict(size=size, times_s=times,
                dit_over_pvt=times['mask_rcnn_dit_b2'] / times['mask_rcnn_pvtv2_b2'],
                dit_backbone_real_over_static=flops['real'] / flops['static'])


def _open_budget_gates(dit, mu: float = 1.0) -> None:
    """Gate biases such that the untrained DiT spends about ``mu x C_base``:
    the diagonal keeps every token, off-diagonal nodes and column edges keep
    the fraction that fills the remaining budget. (Stands in for a trained
    model, which we do not have at this size.)"""
    cost = dit.grid_cost((512, 512))
    spare = max(0.0, mu * cost.static - cost.static)
    extra = cost.full - cost.static
    p = min(1.0, spare / extra) if extra else 0.0
    logit = float(torch.logit(torch.tensor(min(max(p, 1e-3), 1 - 1e-3))))
    with torch.no_grad():
        for key, g in list(dit.row_gates.items()) + list(dit.col_gates.items()):
            diag = key.split('_')[0][1:] == key.split('_')[1][1:]
            g.proj.weight.zero_()
            g.proj.bias.copy_(torch.tensor([0.0, 10.0 if diag else logit]))
            g.reset_ema()


def bench_train_step(size: int, batch: int, rounds: int) -> dict:
    import copy

    from dit_mm.engine.hooks import BudgetLossHook
    pvt, dit = build_pair('b2')
    dit.routing = 'dynamic'
    _open_budget_gates(dit, mu=1.0)  # gates that spend PVTv2's cost
    sparse = copy.deepcopy(dit)
    sparse.sparse_training = True
    pvt.train()
    dit.train()
    sparse.train()
    hook = BudgetLossHook(mu=1.0, loss_weight=2.0)
    x = torch.randn(batch, 3, size, size)
    opt_p = torch.optim.AdamW(pvt.parameters(), lr=1e-4)
    opt_d = torch.optim.AdamW(dit.parameters(), lr=1e-4)
    opt_s = torch.optim.AdamW(sparse.parameters(), lr=1e-4)

    def step(model, opt, budget):
        def f():
            opt.zero_grad()
            loss = sum(o.float().square().mean() for o in model(x))
            if budget:
                loss = loss + hook.loss_weight * model.budget_loss(hook.mu)
            loss.backward()
            opt.step()
        return f
    times = interleaved({'train_pvtv2_b2': step(pvt, opt_p, False),
                         'train_dit_b2_mu1': step(dit, opt_d, True),
                         'train_dit_b2_mu1_sparse': step(sparse, opt_s, True)}, rounds)
    return dict(size=size, batch=batch, times_s=times,
                dit_over_pvt=times['train_dit_b2_mu1'] / times['train_pvtv2_b2'],
                sparse_dit_over_pvt=times['train_dit_b2_mu1_sparse'] / times['train_pvtv2_b2'],
                note='default training uses the dense masked path (the straight-through '
                     'gradient needs B(x) at skipped tokens); sparse_training=True computes '
                     'kept tokens only; see docs/design.md')


def _rss_mib() -> float:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def peak_rss_growth_mib(fn: Callable[[], object], interval: float = 0.0005) -> float:
    """Peak RSS growth (MiB) while ``fn()`` runs over the RSS just before it,
    sampled every ``interval`` seconds by a thread."""
    import threading
    base = _rss_mib()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(interval)
    thread = threading.Thread(target=sample)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return peak[0] - base


def _peak_child(spec: dict, queue) -> None:
    torch.set_num_threads(spec['threads'])
    pvt, dit = build_pair('b2')
    model = pvt if spec['model'] == 'pvt' else dit
    if spec['model'] != 'pvt':
        dit.routing, dit.keep_ratio = spec['routing'], spec['keep_ratio']
    del pvt, dit
    x = torch.randn(spec['batch'], 3, spec['size'], spec['size'])
    with torch.no_grad():
        model(x)  # warm-up: allocator caches, oneDNN primitives
        queue.put(peak_rss_growth_mib(lambda: model(x)))


def peak_memory(size: int, batch: int, threads: int) -> Dict[str, float]:
    """Peak RSS growth (MiB) during one forward over the RSS just before it,
    sampled every 0.5 ms by a thread, in a fresh process per variant (after
    one warm-up forward)."""
    ctx = mp.get_context('spawn')
    variants = {'pvtv2_mmdet': dict(model='pvt'),
                'dit_static': dict(model='dit', routing='static', keep_ratio=None)}
    for r in RATIOS:
        variants[f'dit_full_r{r}'] = dict(model='dit', routing='full', keep_ratio=r)
    out = {}
    for name, spec in variants.items():
        q = ctx.Queue()
        p = ctx.Process(target=_peak_child, args=(dict(spec, size=size, batch=batch,
                                                       threads=threads), q))
        p.start()
        out[name] = q.get()
        p.join()
    return out


def print_table(res: dict) -> None:
    print('\n## Static path overhead and skip efficiency (DiT-b2, medians)')
    print('| malloc | input | batch | DiT static / PVTv2 | r = 1 Python / C++ | r '
          '| latency(r)/latency(1) | real FLOPs ratio | target |')
    print('|---|---|---|---|---|---|---|---|---|')
    for row in res['backbones']:
        for s in row['skip']:
            tgt = f'<= {s["target"]:.2f}' if s['target'] else ''
            print(f'| {row.get("malloc", "system")} | {row["size"]}² | {row["batch"]} | '
                  f'{row["static_over_pvt"]:.3f} | {row["python_dense_over_native"]:.3f} | '
                  f'{s["keep_ratio"]} | {s["latency_ratio"]:.3f} | '
                  f'{s["real_flops_ratio"]:.3f} | {tgt} |')
    print('\n## Gate/gather/scatter share of backbone time (torch.profiler)')
    for p in res['profile']:
        parts = ', '.join(f'{k} {v * 100:.1f}%' for k, v in p['share'].items())
        print(f'- {p["size"]}², batch {p["batch"]}, r={p["keep_ratio"]}: '
              f'{p["total_share"] * 100:.1f}% gate+gather+scatter ({parts})')
    if 'mask_rcnn' in res:
        m = res['mask_rcnn']
        print(f'\n## Mask R-CNN eval forward {m["size"]}²: DiT-b2 / PVTv2-b2 = '
              f'{m["dit_over_pvt"]:.3f} ({m["times_s"]}), DiT backbone real/static = '
              f'{m["dit_backbone_real_over_static"]:.3f}')
    if 'train' in res:
        t = res['train']
        print(f'\n## Training step {t["size"]}² batch {t["batch"]}: DiT-b2 (mu=1) / PVTv2-b2 = '
              f'{t["dit_over_pvt"]:.3f} dense masked, {t["sparse_dit_over_pvt"]:.3f} '
              f'sparse_training ({t["times_s"]})')
    if 'peak_memory_mib' in res:
        size = max(res['sizes'])
        print(f'\n## Peak memory (MiB, RSS growth during one forward, {size}², batch 4)')
        for k, v in res['peak_memory_mib'].items():
            print(f'- {k}: {v:.0f}')


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default=default_out('backbone'))
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--malloc', nargs='+', choices=['system', 'keep'],
                        default=['system', 'keep'],
                        help='allocator modes for the backbone table (each in its own process)')
    parser.add_argument('--sizes', type=int, nargs='+', default=[224, 512])
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 4])
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--quick', action='store_true',
                        help='224 only, 1 round, no Mask R-CNN/training/memory')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.quick:
        args.sizes, args.rounds = [224], 1
    res: dict = dict(machine=dict(platform=platform.platform(), threads=args.threads,
                                  torch=torch.__version__), rounds=args.rounds,
                     sizes=args.sizes, malloc_other_sections='system')
    print('[1/5] backbones', flush=True)
    res['backbones'] = bench_backbones_per_allocator(args.malloc, args.sizes, args.batches,
                                                     args.rounds, args.threads)
    print('[2/5] profiler', flush=True)
    big = max(args.sizes)
    res['profile'] = [profile_overhead(big, 1, 1.0), profile_overhead(big, 4, 0.5)]
    if not args.quick:
        print('[3/5] Mask R-CNN', flush=True)
        res['mask_rcnn'] = bench_mask_rcnn(512, args.rounds)
        print('[4/5] training step', flush=True)
        res['train'] = bench_train_step(256, 2, args.rounds)
        print('[5/5] peak memory', flush=True)
        res['peak_memory_mib'] = peak_memory(big, 4, args.threads)
    with open(args.out, 'w') as f:
        json.dump(res, f, indent=2)
    print_table(res)
    print(f'\nwritten: {args.out}')
    return res


if __name__ == '__main__':
    main()
