"""The package layout: imports point one way, the public surface holds.

The import graph is read from the source with ``ast`` (every ``import`` and
``from ... import``, at module level and inside functions, relative and
absolute), so an import that only runs on some code path counts too.

* ``dit_mm.models``: the model in plain PyTorch; reaches the executors only
  through the seam ``dit_mm.accel``;
* ``dit_mm.accel``: the seam (``__init__``), the reference ops, the caches
  and the executors (``accel.cpu``); imports nothing from the packages that
  use it;
* ``dit_mm.engine``, ``dit_mm.analysis``: mmengine integration and analysis,
  on top of ``models``;
* ``dit_mm.datasets``: the toy generators, standalone;
* ``dit_mm.utils``: helpers for everyone, importing no other part.
"""
from __future__ import annotations

import ast
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'dit_mm'

#: Top-level parts of dit_mm -> the parts each may import (itself always).
ALLOWED = {
    'utils': set(),
    'datasets': set(),
    'accel': {'utils'},
    'models': {'accel', 'utils'},
    'engine': {'models', 'utils'},
    'analysis': {'models', 'engine', 'utils', ''},  # '': the package root (registration)
    '': {'models', 'engine', 'accel', 'utils', 'analysis', 'datasets'},
}


def module_names(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``package``."""
    out = {}
    for path in sorted(package.rglob('*.py')):
        parts = path.relative_to(package.parent).with_suffix('').parts
        if parts[-1] == '__init__':
            parts = parts[:-1]
        out['.'.join(parts)] = path
    return out


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports, anywhere in its
    source. ``from X import name`` targets ``X.name`` where that is a
    module, else ``X``; ``import X.Y`` targets the longest known prefix."""
    modules = module_names(package)
    top = package.name
    graph: dict[str, set[str]] = {}

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition('.')[0]
        return name or None

    for name, path in modules.items():
        is_pkg = path.name == '__init__.py'
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                bases = [alias.name for alias in node.names]
                names: list[str] = []
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = name.split('.') if is_pkg else name.split('.')[:-1]
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = '.'.join(anchor + ([node.module] if node.module else []))
                else:
                    base = node.module or ''
                bases = [base]
                names = [alias.name for alias in node.names]
            else:
                continue
            for base in bases:
                if base != top and not base.startswith(top + '.'):
                    continue
                subs = [f'{base}.{n}' for n in names if f'{base}.{n}' in modules]
                if subs and len(subs) == len(names):
                    targets.update(subs)
                else:
                    targets.update(subs)
                    target = known(base)
                    if target is not None:
                        targets.add(target)
        targets.discard(name)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or ``None``."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _part(module: str) -> str:
    """``dit_mm.models.blocks`` -> ``models``; the root package -> ``''``."""
    parts = module.split('.')
    return parts[1] if len(parts) > 1 else ''


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports against :data:`ALLOWED`, and imports of ``dit_mm.accel``'s
    insides from outside it (only the seam ``dit_mm.accel`` is public)."""
    bad = []
    for mod, targets in sorted(graph.items()):
        src = _part(mod)
        for target in sorted(targets):
            dst = _part(target)
            if dst != src and dst not in ALLOWED[src]:
                bad.append(f'{mod} -> {target}: {src or "dit_mm"} may not import {dst or "dit_mm"}')
            elif dst == 'accel' and src != 'accel' and target != 'dit_mm.accel':
                bad.append(f'{mod} -> {target}: outside accel, import only the seam dit_mm.accel')
    return bad


@pytest.fixture(scope='module')
def graph() -> dict[str, set[str]]:
    return import_graph(PACKAGE)


def test_the_graph_sees_module_level_function_level_and_relative_imports(graph):
    """The parser must see the edges it is meant to check (else the tests
    below pass on an empty graph)."""
    assert 'dit_mm.accel' in graph['dit_mm.models.blocks']  # from ..accel import (...)
    assert 'dit_mm.accel.cpu' in graph['dit_mm.accel']  # from . import cpu, reference
    assert 'dit_mm.accel.reference' in graph['dit_mm.accel.cpu.sparse_ops']  # from .. import
    assert 'dit_mm.engine.runtime' in graph['dit_mm.analysis.loading']  # inside a function
    assert 'dit_mm' in graph['dit_mm.analysis.loading']  # 'import dit_mm' inside a function
    assert {'dit_mm.models', 'dit_mm.engine'} <= graph['dit_mm']
    assert len(graph) > 25


def test_no_import_cycles(graph):
    assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))


def test_imports_point_one_way(graph):
    assert layer_violations(graph) == []
    # the seam is what models use of accel; engine and analysis use models
    assert {t for m, ts in graph.items() if m.startswith('dit_mm.models')
            for t in ts if _part(t) == 'accel'} == {'dit_mm.accel'}
    for part in ('engine', 'analysis'):
        assert any(_part(t) == 'models' for m, ts in graph.items()
                   if _part(m) == part for t in ts), part


def test_models_use_a_handful_of_names_from_the_seam():
    """The node is the unit of execution: ``models`` asks the seam to run a
    node (``run_node``) and for the few ops of its dense and masked forwards,
    not for an executor's parts (tables, kernels, row buckets)."""
    import dit_mm.accel as accel
    names = set()
    for path in (PACKAGE / 'models').rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in ('accel', 'dit_mm.accel'):
                names |= {alias.name for alias in node.names}
    assert 'run_node' in names and names <= set(accel.__all__)
    assert len(names) <= 6, sorted(names)


def test_the_checks_catch_cycles_and_wrong_way_imports(tmp_path):
    """A made-up package with a function-level relative import from accel
    back into models, and a cycle through it."""
    pkg = tmp_path / 'dit_mm'
    for sub in ('models', 'accel', 'accel/cpu'):
        (pkg / sub).mkdir(parents=True)
    (pkg / '__init__.py').write_text('from .models import net\n')
    (pkg / 'models' / '__init__.py').write_text('')
    (pkg / 'models' / 'net.py').write_text('from ..accel.cpu import fast\n')
    (pkg / 'accel' / '__init__.py').write_text('')
    (pkg / 'accel' / 'cpu' / '__init__.py').write_text('')
    (pkg / 'accel' / 'cpu' / 'fast.py').write_text(
        'def f():\n    from ...models.net import g\n    import dit_mm.models\n')
    g = import_graph(pkg)
    assert g['dit_mm.accel.cpu.fast'] == {'dit_mm.models.net', 'dit_mm.models'}
    cycle = find_cycle(g)
    assert cycle[0] == cycle[-1] and set(cycle) == {'dit_mm.accel.cpu.fast', 'dit_mm.models.net'}
    bad = layer_violations(g)
    assert any(b.startswith('dit_mm.accel.cpu.fast -> dit_mm.models.net') for b in bad)
    assert any(b.startswith('dit_mm.models.net -> dit_mm.accel.cpu.fast: outside accel')
               for b in bad)


def test_every_executor_provides_the_seam_interface():
    from dit_mm import accel
    for device, ex in accel.EXECUTORS.items():
        missing = [n for n in accel.EXECUTOR_API if not hasattr(ex, n)]
        assert not missing, f'{device} executor lacks {missing}'


def test_public_names_import_and_register_from_a_fresh_interpreter():
    """What ``custom_imports=dict(imports=['dit_mm'])`` relies on."""
    code = '\n'.join([
        'from mmengine.registry import HOOKS, MODELS, OPTIM_WRAPPERS',
        'from mmengine.utils import import_modules_from_strings',
        "import_modules_from_strings(['dit_mm'])",
        'from dit_mm import DiT, BudgetLossHook, IterSeedHook, CPUAmpOptimWrapper',
        "assert MODELS.get('DiT') is DiT",
        "assert HOOKS.get('BudgetLossHook') is BudgetLossHook",
        "assert HOOKS.get('IterSeedHook') is IterSeedHook",
        "assert OPTIM_WRAPPERS.get('CPUAmpOptimWrapper') is CPUAmpOptimWrapper",
        "assert DiT.__module__ == 'dit_mm.models.backbone'",
        "print('ok')"])
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         cwd=ROOT, env=_env())
    assert out.returncode == 0 and out.stdout.split()[-1] == 'ok', out.stderr[-2000:]


def _env() -> dict:
    import os
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')])
    return env


#: sha1 of DiT-b0's state-dict keys and shapes, as before the package was
#: split into models/accel/engine/... (checkpoints must keep loading).
B0_STATE_SHA1 = '228732e013451ff183a1a8868f4fea2db9591cfe'


def test_checkpoint_keys_are_unchanged():
    """The keys of the first checkpoints are all there, unchanged; the
    entries added since (EMA ramp, budget dial) are declared optional, and
    a checkpoint without them loads (tests/test_budget_dial.py)."""
    from dit_mm import DiT
    full = DiT(arch='b0').state_dict()
    assert set(DiT.optional_state_keys) <= set(full)
    sd = {k: v for k, v in full.items() if k not in DiT.optional_state_keys}
    text = '\n'.join(f'{k} {tuple(v.shape)}' for k, v in sd.items())
    assert {k.split('.')[0] for k in sd} == {'gate_temperature', 'stem', 'embeds', 'stages',
                                           'row_gates', 'col_gates'}
    assert hashlib.sha1(text.encode()).hexdigest() == B0_STATE_SHA1
