"""The model zoo in OpenMMLab's format: ``model-index.yml`` and
``configs/{classification,detection,segmentation}/metafile.yml``.

* the index imports exactly the three metafiles, and mim's own loader
  (``modelindex``) reads them;
* every config in a metafile exists, and every config under ``configs/*/``
  (``_base_`` aside) is in its task's metafile, once;
* the metadata agree with the configs (arch, budget ``mu``, schedule, batch,
  routing variant), results are in the task's format, ``Weights`` is null,
  and the toy configs carry no paper results;
* ``configs/README.md`` shows the same numbers as the metafiles;
* every config loads with ``Config.fromfile`` and its backbone (type
  ``DiT``) builds, shrunk to DiT-B0; each distinct backbone runs once on a
  32x32 image. The whole models are built and stepped by
  ``tests/test_configs.py`` and ``tests/test_classification.py``.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import yaml
from mmengine.config import Config
from mmengine.registry import MODELS

import dit_mm
from dit_mm.models.grid import resolve_arch

REPO = Path(__file__).resolve().parents[1]
TASKS = ('classification', 'detection', 'segmentation')
METAFILES = {task: f'configs/{task}/metafile.yml' for task in TASKS}
COLLECTIONS = {'classification': 'DiT-Classification', 'detection': 'DiT-Detection',
               'segmentation': 'DiT-Segmentation'}
# Task -> {result task: (dataset, metric names)}
RESULT_FORMAT = {
    'classification': {'Image Classification': ('ImageNet-1k', {'Top 1 Accuracy'})},
    'detection': {'Object Detection': ('COCO', {'box AP'}),
                  'Instance Segmentation': ('COCO', {'mask AP'})},
    'segmentation': {'Semantic Segmentation': ('ADE20K', {'mIoU'})},
}
# Configs the paper reports nothing for (besides the toys): Table 3 has no B1 rows.
NO_PAPER_RESULTS = {'mask_rcnn_dit_b1_3x', 'retinanet_dit_b1_3x'}
PAPER_URL = 'https://arxiv.org/abs/2308.03409'
PAPER_TITLE = 'DiT: Efficient Vision Transformers with Dynamic Token Routing'


def _load(rel: str):
    with open(REPO / rel) as f:
        return yaml.safe_load(f)


def _models() -> list:
    """(task, model entry) for every model of every metafile."""
    out = []
    for task, rel in METAFILES.items():
        out += [(task, m) for m in _load(rel)['Models']]
    return out


MODELS_ = _models()


def _config_files() -> set:
    return {p.relative_to(REPO).as_posix() for task in TASKS
            for p in (REPO / 'configs' / task).rglob('*.py') if '_base_' not in p.parts}


def test_model_index_imports_the_three_metafiles():
    index = _load('model-index.yml')
    assert list(index) == ['Import']
    assert sorted(index['Import']) == sorted(METAFILES.values())
    assert len(set(index['Import'])) == len(index['Import'])
    for task, rel in METAFILES.items():
        meta = _load(rel)
        assert set(meta) == {'Collections', 'Models'}, rel
        assert [c['Name'] for c in meta['Collections']] == [COLLECTIONS[task]]
        assert meta['Models'], rel


def test_modelindex_loads():
    """mim reads the zoo through ``modelindex``; its only complaint may be the
    README path, which OpenMMLab metafiles give from the repository root while
    ``modelindex`` resolves it next to the metafile."""
    modelindex = pytest.importorskip('modelindex')
    index = modelindex.load(str(REPO / 'model-index.yml'))
    assert sorted(m.name for m in index.models) == sorted(m['Name'] for _, m in MODELS_)
    assert sorted(c.name for c in index.collections) == sorted(COLLECTIONS.values())
    errors = [e for e in index.check(silent=True) if 'Path to README file' not in e]
    assert not errors, errors
    for model in index.models:  # metadata merged with the collection's
        assert 'DiT' in model.full_model.metadata.data['Architecture']


@pytest.mark.parametrize('task', TASKS)
def test_collection(task):
    (col,) = _load(METAFILES[task])['Collections']
    assert col['Paper'] == {'URL': PAPER_URL, 'Title': PAPER_TITLE}
    assert (REPO / col['README']).is_file()
    assert (REPO / col['Code']['URL']).is_file()
    meta = col['Metadata']
    for key in ('Training Data', 'Training Techniques', 'Training Resources', 'Architecture'):
        assert meta.get(key), (task, key)
    assert {'DiT', 'Dynamic Token Routing'} <= set(meta['Architecture'])
    assert 'Budget Loss' in meta['Training Techniques']


def test_configs_listed_exist_and_every_config_is_listed():
    names = [m['Name'] for _, m in MODELS_]
    assert len(names) == len(set(names)), 'duplicate model names'
    listed = [m['Config'] for _, m in MODELS_]
    assert len(listed) == len(set(listed)), 'a config is listed twice'
    for task, model in MODELS_:
        path = REPO / model['Config']
        assert path.is_file(), model['Config']
        assert model['Config'].startswith(f'configs/{task}/'), (task, model['Config'])
        assert model['Name'] == path.stem
        assert model['In Collection'] == COLLECTIONS[task]
    missing = sorted(_config_files() - set(listed))
    assert not missing, f'configs missing from the metafiles: {missing}'


@pytest.mark.parametrize('task,model', MODELS_, ids=[m['Name'] for _, m in MODELS_])
def test_entry_format(task, model):
    assert 'Weights' in model and model['Weights'] is None, 'nothing is trained here'
    meta = model['Metadata']
    assert re.fullmatch(r'DiT-B[0-5]', meta['Backbone'])
    assert ('Epochs' in meta) != ('Iterations' in meta)
    toy = model['Name'].endswith('_toy')
    assert bool(meta.get('Toy', False)) == toy
    if toy or model['Name'] in NO_PAPER_RESULTS:
        assert 'Results' not in model, 'no paper numbers for this config'
        assert 'FLOPs' not in meta
        return
    assert model['Results']
    formats = RESULT_FORMAT[task]
    for result in model['Results']:
        dataset, metrics = formats[result['Task']]
        assert result['Dataset'] == dataset
        assert set(result['Metrics']) <= metrics
        assert all(0 < v < 100 for v in result['Metrics'].values())
    if 'FLOPs' in meta:
        assert isinstance(meta['FLOPs'], int) and meta['FLOPs'] >= 10 ** 9


def _readme_row(config: str) -> str:
    rows = [line for line in (REPO / 'configs' / 'README.md').read_text().splitlines()
            if line.startswith('|') and f'`{config}`' in line]
    assert len(rows) == 1, f'configs/README.md: {len(rows)} table rows for {config}'
    return rows[0]


@pytest.mark.parametrize('task,model', MODELS_, ids=[m['Name'] for _, m in MODELS_])
def test_readme_row_agrees(task, model):
    """The model-zoo page shows each config once, with the metafile's mu,
    paper metrics and paper GFLOPs."""
    row = _readme_row(model['Config'].removeprefix('configs/'))
    numbers = {float(x) for x in re.findall(r'\d+(?:\.\d+)?', row)}
    meta = model['Metadata']
    if 'Budget mu' in meta:
        assert meta['Budget mu'] in numbers, row
    if 'FLOPs' in meta:
        assert meta['FLOPs'] / 1e9 in numbers, row
    for result in model.get('Results', []):
        for value in result['Metrics'].values():
            assert value in numbers, row


_BUILT: set = set()


@pytest.mark.parametrize('task,model', MODELS_, ids=[m['Name'] for _, m in MODELS_])
def test_config_loads_agrees_and_builds(task, model):
    cfg = Config.fromfile(str(REPO / model['Config']))
    assert 'dit_mm' in cfg.custom_imports['imports']
    backbone = cfg.model.backbone
    assert backbone.type == 'DiT'
    meta = model['Metadata']
    arch = meta['Backbone'].removeprefix('DiT-').lower()
    assert backbone.arch == arch
    resolve_arch(arch)

    routing = backbone.get('routing', 'dynamic')
    assert meta.get('Routing', 'dynamic') == routing
    assert meta.get('Gate', 'learned') == backbone.get('gate', 'learned')
    assert meta.get('Depth Routing', True) == backbone.get('depth_routing', True)
    assert meta.get('Scale Routing', True) == backbone.get('scale_routing', True)
    (hook,) = [h for h in cfg.custom_hooks if h['type'] == 'BudgetLossHook']
    if routing in ('static', 'full'):  # the hook adds no budget term
        assert 'Budget mu' not in meta
    else:
        assert meta['Budget mu'] == pytest.approx(hook['mu'])

    train_cfg = cfg.train_cfg
    if 'Epochs' in meta:
        assert train_cfg.get('by_epoch', True) and train_cfg.max_epochs == meta['Epochs']
    else:
        assert train_cfg.max_iters == meta['Iterations']
    batch = cfg.get('auto_scale_lr', {}).get('base_batch_size', cfg.train_dataloader.batch_size)
    assert meta['Batch Size'] == batch
    if 'Crop Size' in meta:
        assert meta['Crop Size'] == str(tuple(cfg.model.data_preprocessor.size))

    small = copy.deepcopy(backbone.to_dict())
    small.update(arch='b0', init_cfg=None)
    net = MODELS.build(small)
    assert isinstance(net, dit_mm.DiT)
    key = repr(sorted(small.items()))
    if key in _BUILT:
        return
    _BUILT.add(key)
    net.init_weights()
    net.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            feats = net(torch.randn(1, 3, 32, 32))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.isfinite(f).all() for f in feats)
