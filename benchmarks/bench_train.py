"""Training-step cost of DiT-b2 (``--arch``): time and peak memory per variant, and where
the time of a masked step goes, node by node.

    python benchmarks/bench_train.py [--inputs 512x512x2 800x1344x1] [--rounds 3]
                                     [--allocators keep system] [--variants ...]
                                     [--no-memory] [--no-nodes] [--merge]
                                     [--out FILE]

(``FILE`` defaults to ``benchmarks/results/train-cpu-<family>-torch<version>.json``.)

One step = forward and backward of the backbone alone at random init, with a
squared-sum loss on its outputs plus, for the gated variants, the budget term
``2 (C_expected / C_base - mu)^2`` (no optimizer step: what differs between
the variants is the backbone). Variants:

* ``pvtv2_mmdet``: mmdet's ``PyramidVisionTransformerV2``-b2 (same weights);
* ``static``: DiT-b2 ``routing='static'`` (PVTv2's path);
* ``full``: ``routing='full'``, no gates, every node and token;
* ``masked``: ``routing='dynamic'``, the default training path (the whole grid,
  skipped tokens held), gates at their init;
* ``masked_cp``: the same with ``with_cp=True``;
* ``sparse_init``: ``sparse_training=True``, gates at their init;
* ``sparse_mu086`` / ``sparse_mu086_cp``: ``sparse_training=True`` with gates set to
  spend mu = 0.86 (the paper's Mask R-CNN budget; diagonal open, the rest at
  the keep probability that fills the budget), without / with ``with_cp``.

Step times are medians of ``--rounds`` interleaved rounds after two warm-up
rounds, in one process per allocator mode: ``keep`` keeps freed memory for
reuse (:func:`dit_mm.engine.runtime.keep_freed_memory`, what ``tools/train.py``
sets on the CPU) on a heap grown up front (:func:`prefault_heap`), ``system``
is glibc's default, which returns freed blocks to the kernel so that every
step page-faults its activations back in. Peak
memory is the growth of the RSS during one step over the RSS before it, each
variant in its own process (after a warm-up step), under ``system`` (under
``keep`` the heap already holds the warm-up step's peak). Next to each time:
the FLOPs the step's forward computes and the FLOPs of the routes it takes
(for a gated variant, the mean over its timed steps), as multiples of
``C_base``. The node table times one masked training step of
every grid node alone (forward and backward on an input of the node's shape)
against its share of the full grid's FLOPs, under the first allocator mode.

The issue's targets are evaluated from the measurements of each input and
allocator (``targets`` in the JSON, and printed): full-grid step <= 1.2 x
(C_full / C_base) x static; masked <= 1.05 x full; masked ``with_cp`` peak
memory <= 1.3 x static; sparse at mu = 0.86 <= 1.1 x (its routes / C_base) x
static.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

try:
    from bench_backbone import build_pair, default_out, interleaved, peak_rss_growth_mib
except ImportError:  # imported as benchmarks.bench_train
    from .bench_backbone import build_pair, default_out, interleaved, peak_rss_growth_mib

ALLOCATORS = ('keep', 'system')
VARIANTS = ('pvtv2_mmdet', 'static', 'full', 'masked', 'masked_cp', 'sparse_init',
            'sparse_mu086', 'sparse_mu086_cp')
MU = 0.86
#: interleaved warm-up rounds before the timed ones
WARMUP = 2
#: the arch benchmarked (``--arch``; the tests use b0)
ARCH = 'b2'


def set_budget_gates(dit, mu: float, size: Tuple[int, int]) -> None:
    """Gate biases with which the untrained DiT spends about ``mu x C_base``
    at ``size`` (a stand-in for a trained model, which we do not have at this
    size). ``mu >= 1``: diagonal nodes keep every token, the extra nodes and
    column edges keep the probability that fills what is left. ``mu < 1``:
    the extra nodes and column edges are closed (keep logit -10), and the
    diagonal nodes keep the fraction of their tokens that spends ``mu``."""
    cost = dit.grid_cost(size)
    diag = [n for n in cost.nodes if n[0] == n[1]]
    token_part = sum(cost.nodes[n].token * cost.nodes[n].tokens for n in diag)
    gates = sum(cost.nodes[n].row_gate for n in cost.nodes) + sum(cost.col_gates.values())

    def logit(p: float) -> float:
        return float(torch.logit(torch.tensor(min(max(p, 1e-4), 1 - 1e-4))))
    if mu >= 1.0:
        extra = cost.full - cost.static
        p_extra = min(1.0, max(0.0, (mu - 1.0) * cost.static - gates) / extra) if extra else 0.0
        on_diag, off_diag = 10.0, logit(p_extra)
    else:
        p_diag = (mu * cost.static - gates - (cost.static - token_part)) / token_part
        on_diag, off_diag = logit(p_diag), -10.0
    with torch.no_grad():
        for key, g in list(dit.row_gates.items()) + list(dit.col_gates.items()):
            i, j = key.split('_')
            g.proj.weight.zero_()
            g.proj.bias.copy_(torch.tensor([0.0, on_diag if i[1:] == j[1:] and
                                            key in dit.row_gates else off_diag]))
            g.reset_ema()


def build_variant(name: str, size: Tuple[int, int]):
    """``(model, gated)`` for a variant name, in training mode."""
    pvt, dit = build_pair(ARCH)
    if name == 'pvtv2_mmdet':
        return pvt.train(), False
    routing = {'static': 'static', 'full': 'full'}.get(name, 'dynamic')
    dit.routing = routing
    if name.startswith('sparse'):
        dit.sparse_training = True
    if name.startswith('sparse_mu'):
        set_budget_gates(dit, MU, size)
    if name.endswith('_cp'):
        for stage in dit.stages.values():
            stage.with_cp = True
        dit.with_cp = True
    return dit.train(), routing == 'dynamic'


def step_fn(model, gated: bool, x: torch.Tensor,
            routes: Optional[List[float]] = None) -> Callable[[], None]:
    """One training step of ``model`` on ``x``; for a gated model, appends
    the real FLOPs of the routes it took (x ``C_base``) to ``routes``."""
    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss = sum(o.float().square().mean() for o in model(x))
        if gated:
            loss = loss + 2.0 * model.budget_loss(MU)
            if routes is not None:
                spent = model.flops()
                routes.append(spent['real'] / spent['static'])
        loss.backward()
        # nothing of the step outlives it: under the keep allocator, gradients left
        # between the variants' steps pinned the heap (12.8 GB at 512x512x2)
        model.zero_grad(set_to_none=True)
    return step


def routed_flops(model, gated: bool, x: torch.Tensor) -> Dict[str, float]:
    """FLOPs of the routes taken (x C_base) and FLOPs the step computes."""
    if not hasattr(model, 'grid_cost'):
        return dict(routes=1.0, computed=1.0)
    cost = model.grid_cost(tuple(x.shape[2:]))
    with torch.no_grad():
        model(x)
    real = model.flops()['real'] * 1e9 / cost.static
    if model.routing == 'static':
        return dict(routes=1.0, computed=1.0)
    if model.routing == 'full' or not model.sparse_training:
        return dict(routes=real, computed=cost.full / cost.static)  # the whole grid runs
    return dict(routes=real, computed=real)


def bench_times(shape: Tuple[int, int, int], variants: Sequence[str], rounds: int) -> dict:
    """Interleaved step times of ``variants``. The routes of a gated
    variant are the mean real FLOPs of its timed steps: they vary from step
    to step with the sampled decisions (a grid node that keeps one token
    pays its map-wise part), and one extra forward measured 0.86-0.90 x
    ``C_base`` for the same gates."""
    h, w, b = shape
    x = torch.randn(b, 3, h, w)
    models = {n: build_variant(n, (h, w)) for n in variants}
    routes: Dict[str, List[float]] = {n: [] for n in variants}
    steps = {n: step_fn(m, g, x, routes[n]) for n, (m, g) in models.items()}
    samples: Dict[str, List[float]] = {}
    times = interleaved(steps, rounds, warmup=WARMUP, spread=samples)
    flops = {n: routed_flops(m, g, x) for n, (m, g) in models.items()}
    for n, spent in routes.items():
        if spent and models[n][0].sparse_training:  # the timed steps' own routes
            timed_routes = statistics.mean(spent[-rounds:])
            flops[n] = dict(routes=timed_routes, computed=timed_routes)
        elif spent:
            flops[n]['routes'] = statistics.mean(spent[-rounds:])
    base = times.get('static')
    rows = {}
    for n in variants:
        rows[n] = dict(step_s=times[n], samples_s=samples[n], **{f'flops_{k}': v for k, v in
                                                                 flops[n].items()})
        if routes[n]:
            rows[n]['routes_samples'] = routes[n][-rounds:]
            # each timed step against its own routes (they vary with the decisions)
            rows[n]['step_per_route_s'] = statistics.median(
                t / r for t, r in zip(samples[n], rows[n]['routes_samples']))
        if base:
            rows[n]['over_static'] = times[n] / base
    print(f'  {h}x{w} batch {b}: ' + ', '.join(f'{n} {t:.2f} s' for n, t in times.items()),
          flush=True)
    return dict(input=[h, w], batch=b, rounds=rounds, variants=rows)


def _from_child(target, args: tuple):
    """``target(*args, queue)`` in a spawned process; what it puts on the queue.
    A child that dies first (e.g. killed for memory) raises instead of
    leaving the parent waiting."""
    import queue as queue_mod
    ctx = mp.get_context('spawn')
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    while True:
        try:
            got = q.get(timeout=5)
            break
        except queue_mod.Empty:
            if not p.is_alive():
                raise RuntimeError(f'{target.__name__}{args[:2]}: the child process died '
                                   f'(exit code {p.exitcode}; -9 is usually out of memory)'
                                   ) from None
    p.join()
    return got


def _times_child(malloc: str, shape: Tuple[int, int, int], variants: Sequence[str],
                 rounds: int, threads: int, arch: str, queue) -> None:
    """:func:`bench_times` in a fresh process under allocator mode ``malloc``."""
    global ARCH
    ARCH = arch
    from dit_mm.engine.runtime import keep_freed_memory
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if malloc == 'keep':
        if not keep_freed_memory():
            queue.put(None)  # not glibc
            return
        prefault_heap(_prefault_bytes(shape))
    queue.put(dict(bench_times(shape, variants, rounds), malloc=malloc))


def _prefault_bytes(shape: Tuple[int, int, int]) -> int:
    """What :func:`prefault_heap` touches for an input ``(h, w, batch)``:
    8 GiB at 512x512 batch 2, in proportion to the pixels, and at most 60 %
    of the machine's memory."""
    h, w, b = shape
    want = 8 * 2 ** 30 * h * w * b / (512 * 512 * 2)
    try:
        total = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
        total = 16 * 2 ** 30
    return int(min(want, 0.6 * total))


def prefault_heap(nbytes: int) -> None:
    """Grows the heap by ``nbytes`` of touched pages and frees them: under
    the ``keep`` allocator they stay with the process, and the variants'
    steps reuse them instead of faulting fresh pages in whenever one of
    them grows the heap. Without it a static step that followed the full
    grid's faulted up to 120k pages in, in rounds long after the first
    (1.40-1.79 s against 1.39-1.43 s with it, 512x512 batch 2)."""
    block = torch.empty(max(nbytes // 4, 1))
    block.fill_(0.0)
    del block


def bench_times_per_allocator(shape: Tuple[int, int, int], variants: Sequence[str],
                              rounds: int, threads: int, modes: Sequence[str]) -> List[dict]:
    """:func:`bench_times` once per allocator mode, each in its own process,
    one after the other."""
    runs = []
    for mode in modes:
        print(f'  allocator {mode}:', flush=True)
        got = _from_child(_times_child, (mode, shape, list(variants), rounds, threads, ARCH))
        if got is None:
            print(f'  allocator mode {mode!r} unavailable here (not glibc); skipped', flush=True)
            continue
        runs.append(got)
    return runs


def _memory_child(name: str, shape: Tuple[int, int, int], threads: int, arch: str,
                  queue) -> None:
    global ARCH
    ARCH = arch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    h, w, b = shape
    model, gated = build_variant(name, (h, w))
    x = torch.randn(b, 3, h, w)
    step = step_fn(model, gated, x)
    step()  # warm-up: allocator caches, oneDNN primitives, .grad tensors
    queue.put(peak_rss_growth_mib(step, interval=0.001) / 1024)


def bench_memory(shape: Tuple[int, int, int], variants: Sequence[str], threads: int
                 ) -> Dict[str, float]:
    """Peak RSS growth (GiB) of one step, each variant in a fresh process."""
    out = {}
    for name in variants:
        out[name] = _from_child(_memory_child, (name, shape, threads, ARCH))
        print(f'    memory {name}: {out[name]:.2f} GiB', flush=True)
    return out


def bench_nodes(shape: Tuple[int, int, int], rounds: int) -> List[dict]:
    """Each grid node's masked training step alone, against its FLOPs share."""
    from dit_mm.models.grid import feature_sizes, node_key
    h, w, b = shape
    _, dit = build_pair(ARCH)
    dit.train()
    cost = dit.grid_cost((h, w))
    sizes = feature_sizes(h, w)
    steps, flops = {}, {}
    for (i, j) in dit.spec.nodes:
        key = node_key(i, j)
        stage = dit.stages[key]
        hw = sizes[i]
        x = torch.randn(b, hw[0] * hw[1], dit.spec.embed_dims[i], requires_grad=True)
        mask = torch.ones(b, hw[0] * hw[1], requires_grad=True)

        def step(stage=stage, x=x, hw=hw, mask=mask) -> None:
            stage.zero_grad(set_to_none=True)
            stage.forward_masked(x, hw, mask).square().mean().backward()
        steps[key] = step
        nc = cost.nodes[(i, j)]
        flops[key] = nc.map + nc.token * nc.tokens
    times = interleaved(steps, rounds, warmup=1)
    t_all, f_all = sum(times.values()), sum(flops.values())
    rows = []
    for key in steps:
        rows.append(dict(node=key, step_s=times[key], time_share=times[key] / t_all,
                         flops_share=flops[key] / f_all,
                         gflop_per_s=flops[key] * 3 / 1e9 / times[key]))
    return rows


def evaluate_targets(run: dict, memory: Dict[str, float]) -> List[dict]:
    """The training-cost issue's targets on one input and allocator: each with
    the measured value, its bound and whether it is met (variants that were
    not run are left out)."""
    rows, out = run['variants'], []

    def add(name: str, value: float, bound: float) -> None:
        out.append(dict(target=name, value=value, bound=bound, met=bool(value <= bound)))
    if 'static' in rows and 'full' in rows:
        ratio = rows['full']['flops_computed']
        add(f'full step / static <= 1.2 x C_full/C_base ({ratio:.2f})',
            rows['full']['step_s'] / rows['static']['step_s'], 1.2 * ratio)
    if 'full' in rows and 'masked' in rows:
        add('masked step / full step <= 1.05',
            rows['masked']['step_s'] / rows['full']['step_s'], 1.05)
    if memory.get('static', 0) > 0 and 'masked_cp' in memory:
        add('masked with_cp peak memory / static <= 1.3',
            memory['masked_cp'] / memory['static'], 1.3)
    if 'static' in rows and 'sparse_mu086' in rows:
        sparse = rows['sparse_mu086']
        add(f"sparse mu=0.86 step / static <= 1.1 x routes ({sparse['flops_routes']:.2f})",
            sparse['step_s'] / rows['static']['step_s'], 1.1 * sparse['flops_routes'])
        if 'step_per_route_s' in sparse:  # the same, step by step
            add('sparse mu=0.86 step / (its routes x static) <= 1.1, median over steps',
                sparse['step_per_route_s'] / rows['static']['step_s'], 1.1)
    return out


def merge_results(old: dict, new: dict) -> dict:
    """``new``'s runs in place of ``old``'s for the same input, batch and
    allocator; ``old``'s other runs kept."""
    def key(run: dict) -> tuple:
        return tuple(run['input']), run['batch'], run.get('malloc', 'system')
    fresh = {key(r) for r in new['times']}
    merged = dict(new, times=[r for r in old.get('times', []) if key(r) not in fresh]
                  + new['times'])
    for part in ('memory', 'nodes'):
        merged[part] = {**old.get(part, {}), **new.get(part, {})}
    merged['times'].sort(key=lambda r: (r['input'][0] * r['input'][1] * r['batch'],
                                        ALLOCATORS.index(r.get('malloc', 'system'))))
    return merged


def print_tables(res: dict) -> None:
    for run in res['times']:
        h, w = run['input']
        mem = res.get('memory', {}).get(f'{h}x{w}x{run["batch"]}', {})
        malloc = run.get('malloc', 'system')
        print(f'\n### {h}x{w}, batch {run["batch"]}, allocator {malloc} '
              f'(medians of {run["rounds"]} rounds; memory under system)')
        print('| variant | step (s) | / static | FLOPs computed / C_base | routes / C_base '
              '| peak RSS growth (GiB) |')
        print('|---|---|---|---|---|---|')
        for n, r in run['variants'].items():
            m = f'{mem[n]:.2f}' if n in mem else ''
            print(f"| {n} | {r['step_s']:.2f} | {r.get('over_static', float('nan')):.2f} | "
                  f"{r['flops_computed']:.2f} | {r['flops_routes']:.2f} | {m} |")
        for t in evaluate_targets(run, mem):
            print(f"* {t['target']}: {t['value']:.2f} against {t['bound']:.2f}, "
                  f"{'met' if t['met'] else 'missed'}")
    for key, rows in res.get('nodes', {}).items():
        print(f'\n### Masked training step per node, {key} (forward + backward, alone)')
        print('| node | step (ms) | time share | FLOPs share | time / FLOPs share | GFLOP/s |')
        print('|---|---|---|---|---|---|')
        for r in rows:
            print(f"| {r['node']} | {r['step_s'] * 1e3:.0f} | {r['time_share']:.3f} | "
                  f"{r['flops_share']:.3f} | {r['time_share'] / r['flops_share']:.2f} | "
                  f"{r['gflop_per_s']:.1f} |")


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _shape(text: str) -> Tuple[int, int, int]:
    try:
        h, w, b = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'--inputs takes HxWxBATCH, got {text!r}') from None
    if min(h, w) < 32 or b < 1:
        raise argparse.ArgumentTypeError(f'{text!r}: H, W >= 32 and BATCH >= 1')
    return h, w, b


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--inputs', type=_shape, nargs='+',
                        default=[(512, 512, 2), (800, 1344, 1)])
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--variants', nargs='+', choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument('--allocators', nargs='+', choices=ALLOCATORS, default=list(ALLOCATORS),
                        help='allocator modes of the step times, each in its own process')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--arch', default='b2', help="DiT / PVTv2 arch (default 'b2')")
    parser.add_argument('--no-memory', action='store_true')
    parser.add_argument('--no-nodes', action='store_true')
    parser.add_argument('--out', default=default_out('train'))
    parser.add_argument('--merge', action='store_true',
                        help="merge into --out: replace its runs of these inputs, keep the rest")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error('--rounds must be >= 1')
    old = {}
    if args.merge and os.path.isfile(args.out):
        with open(args.out) as f:
            old = json.load(f)
    global ARCH
    ARCH = args.arch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.allocators[0] == 'keep' and not args.no_nodes:  # the node table's mode
        from dit_mm.engine.runtime import keep_freed_memory
        keep_freed_memory()
    res: dict = dict(arch=ARCH, machine=dict(platform=platform.platform(), threads=args.threads,
                                             cpu=_cpu_name(), torch=torch.__version__,
                                             capability=torch.backends.cpu.get_cpu_capability()),
                     mu=MU, times=[], memory={}, nodes={},
                     nodes_malloc=args.allocators[0])
    for k, shape in enumerate(args.inputs):
        print(f'[{k + 1}/{len(args.inputs)}] {shape[0]}x{shape[1]} batch {shape[2]}: step times',
              flush=True)
        runs = bench_times_per_allocator(shape, args.variants, args.rounds, args.threads,
                                         args.allocators)
        res['times'] += runs
        if not args.no_memory:
            res['memory']['x'.join(map(str, shape))] = bench_memory(shape, args.variants,
                                                                    args.threads)
        if not args.no_nodes:
            res['nodes']['x'.join(map(str, shape))] = bench_nodes(shape, args.rounds)
        for run in runs:
            run['targets'] = evaluate_targets(run, res['memory'].get('x'.join(map(str, shape)),
                                                                       {}))
        with open(args.out, 'w') as f:  # after every input: a long run keeps what it measured
            json.dump(merge_results(old, res) if old else res, f, indent=2)
    res = merge_results(old, res) if old else res
    print_tables(res)
    print(f'\nwritten: {args.out}')
    return res


if __name__ == '__main__':
    main()
