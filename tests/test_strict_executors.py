"""An unavailable or disagreeing CPU executor warns once for users and is an
error under ``DIT_MM_STRICT_EXECUTORS=1`` (which ``.ci/run`` sets), so that
CI fails where the fast paths break instead of skipping their tests."""
from __future__ import annotations

import pytest
import torch

from dit_mm.accel.cpu import onednn, sparse_ops, strict


def test_ci_runs_strict():
    """The suite under ``.ci/run`` is strict: executor tests cannot turn into skips."""
    from pathlib import Path
    ci = (Path(__file__).resolve().parents[1] / '.ci' / 'run').read_text()
    assert f'{strict.STRICT_ENV}=1' in ci


def test_unavailable_executor_warns_once_or_raises(monkeypatch, caplog):
    monkeypatch.delenv(strict.STRICT_ENV, raising=False)
    monkeypatch.setattr(strict, '_warned', set())
    warned = []
    monkeypatch.setattr(strict, 'print_log', lambda msg, **kw: warned.append(msg))
    strict.executor_unavailable('thing', 'why')
    strict.executor_unavailable('thing', 'why')
    assert len(warned) == 1 and 'thing unavailable (why)' in warned[0]
    monkeypatch.setenv(strict.STRICT_ENV, '1')
    with pytest.raises(RuntimeError, match='DIT_MM_STRICT_EXECUTORS=1'):
        strict.executor_unavailable('thing', 'why')


def test_a_compile_error_in_the_extension_fails_under_strict(monkeypatch):
    import torch.utils.cpp_extension as cpp

    def broken(**kwargs):
        raise RuntimeError('error: expected ; before } token')
    monkeypatch.setattr(cpp, 'load_inline', broken)
    monkeypatch.setattr(sparse_ops, '_ext', None)
    monkeypatch.setattr(sparse_ops, '_ext_failed', False)
    monkeypatch.delenv('DIT_MM_NO_EXT', raising=False)
    monkeypatch.setenv(strict.STRICT_ENV, '1')
    with pytest.raises(RuntimeError, match='expected ;'):
        sparse_ops._extension()
    monkeypatch.setattr(sparse_ops, '_ext_failed', False)
    monkeypatch.delenv(strict.STRICT_ENV)
    assert sparse_ops._extension() is None  # users: the reference path


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason='no oneDNN in this build')
def test_disagreeing_onednn_ops_fail_under_strict(monkeypatch):
    check = onednn.packed_ops_available.__wrapped__  # not the cached answer
    real = onednn._packed_conv
    monkeypatch.setattr(onednn, '_packed_conv', lambda *a: real(*a) + 1e-3)
    monkeypatch.delenv('DIT_MM_NO_PACKED', raising=False)
    monkeypatch.setenv(strict.STRICT_ENV, '1')
    with pytest.raises(RuntimeError, match='disagree'):
        check()
    monkeypatch.delenv(strict.STRICT_ENV)
    assert check() is False
    monkeypatch.setattr(onednn, '_packed_conv', real)
    assert check() is True
