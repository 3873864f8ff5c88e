"""What happens when a CPU executor is unavailable or disagrees with the
reference: users get the plain-PyTorch path and one warning; CI
(``DIT_MM_STRICT_EXECUTORS=1``, set by ``.ci/run``) gets an error, so that a
broken fast path fails the suite instead of skipping its tests."""
from __future__ import annotations

import os

from mmengine.logging import print_log

STRICT_ENV = 'DIT_MM_STRICT_EXECUTORS'
_warned: set = set()


def strict() -> bool:
    """Whether an unavailable executor is an error (``DIT_MM_STRICT_EXECUTORS=1``)."""
    return os.environ.get(STRICT_ENV) == '1'


def executor_unavailable(what: str, why: str) -> None:
    """Raises under :func:`strict`, else warns once per ``what``.

    Raises:
        RuntimeError: with ``DIT_MM_STRICT_EXECUTORS=1``.
    """
    message = f'dit_mm: {what} unavailable ({why})'
    if strict():
        raise RuntimeError(f'{message}; {STRICT_ENV}=1 makes this an error')
    if what not in _warned:
        _warned.add(what)
        print_log(f'{message}; using the plain PyTorch path', logger='current', level=30)
