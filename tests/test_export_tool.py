"""``tools/export.py``: the static-shape form exported to ONNX and
torch.export, checked against eager PyTorch, with its cost printed; and its
errors."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from mm_utils import load_tool

REPO = Path(__file__).resolve().parents[1]
CLS = str(REPO / 'configs' / 'classification' / 'dit_b0_toy.py')
DET = str(REPO / 'configs' / 'detection' / 'mask_rcnn_dit_b0_toy.py')
EXPORT = load_tool('export')

pytestmark = pytest.mark.usefixtures('one_thread')


def test_onnx_export_of_a_classifier_skips(tmp_path: Path, capsys) -> None:
    pytest.importorskip('onnxruntime')
    out = tmp_path / 'cls.onnx'
    report = EXPORT.main([CLS, '--format', 'onnx', '--keep-ratio', '0.25', '--shape', '96',
                          '96', '--out', str(out)])  # batch 1, the default
    assert out.is_file() and report['static_shapes']
    assert report['max_diff'] < 1e-4
    assert report['gflops'] < report['c_base']  # a quarter of each node's tokens
    assert report['counted_gflops'] == pytest.approx(report['gflops'], rel=0.12)
    assert len(report['slots']) == 10 and report['slots']['s3_t3'] == 3  # ceil(0.25 * 3 * 3)
    assert report['slots']['s0_t0'] == 24 * 24 // 4
    text = capsys.readouterr().out
    assert 'x C_base' in text and 'slots per image' in text


def test_torch_export_of_a_backbone_keeps_the_batch_free(tmp_path: Path) -> None:
    out = tmp_path / 'backbone.pt2'
    report = EXPORT.main([DET, '--format', 'torch-export', '--capacity', '0.3', '--shape',
                          '64', '96', '--backbone-only', '--no-count', '--out', str(out)])
    assert report['max_diff'] < 1e-4
    assert report['counted_gflops'] is None and report['gflops'] < 0.6 * report['c_full']
    program = torch.export.load(str(out))
    for batch in (1, 5):
        feats = program.module()(torch.randn(batch, 3, 64, 96))
        assert feats[0].shape[0] == batch


def test_export_errors_are_clear(tmp_path: Path) -> None:
    out = str(tmp_path / 'x.onnx')
    with pytest.raises(SystemExit, match='calibrate_budget.py'):
        EXPORT.main([CLS, '--format', 'onnx', '--shape', '64', '64', '--out', out])
    with pytest.raises(SystemExit, match=r'\(0, 1\]'):
        EXPORT.main([CLS, '--format', 'onnx', '--capacity', '2', '--out', out])
    with pytest.raises(SystemExit, match='at least 32x32'):
        EXPORT.main([CLS, '--format', 'onnx', '--keep-ratio', '0.5', '--shape', '16', '64',
                     '--out', out])
    with pytest.raises(SystemExit, match="gate='random'"):
        EXPORT.main([CLS, '--format', 'onnx', '--keep-ratio', '0.5', '--out', out,
                     '--cfg-options', 'model.backbone.gate=random'])
    with pytest.raises(SystemExit):  # argparse: one of --budget / --keep-ratio / --capacity
        EXPORT.main([CLS, '--format', 'onnx', '--keep-ratio', '0.5', '--budget', '0.8',
                     '--out', out])


@pytest.mark.skipif(os.environ.get('DIT_MM_SLOW_TESTS') != '1',
                    reason='AOTInductor compiles for about 2 minutes; DIT_MM_SLOW_TESTS=1 runs it')
def test_aoti_package_of_a_backbone(tmp_path: Path) -> None:
    out = tmp_path / 'backbone_aoti.pt2'
    report = EXPORT.main([CLS, '--format', 'aoti', '--keep-ratio', '0.5', '--shape', '64', '64',
                          '--backbone-only', '--no-count', '--out', str(out)])
    assert report['max_diff'] < 1e-4 and out.is_file()
    feats = torch._inductor.aoti_load_package(str(out))(torch.randn(3, 3, 64, 64))
    assert feats[0].shape[0] == 3  # the batch stays free
