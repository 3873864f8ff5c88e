"""dit_mm: DiT (Dynamic Token Routing) backbones as an OpenMMLab plugin."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_requirements() -> tuple[list[str], list[str]]:
    """Split requirements.txt (the one place where the stack is pinned) into
    runtime and dev requirements; dev lines carry a ``# dev`` marker."""
    runtime, dev = [], []
    for line in (HERE / 'requirements.txt').read_text().splitlines():
        spec, _, comment = line.partition('#')
        spec = spec.strip()
        if not spec:
            continue
        (dev if comment.strip() == 'dev' else runtime).append(spec)
    return runtime, dev


RUNTIME, DEV = read_requirements()

setup(
    name='dit_mm',
    version='0.1.0',
    description='DiT: Efficient Vision Transformers with Dynamic Token Routing '
    '(OpenMMLab backbone plugin)',
    long_description=(HERE / 'README.md').read_text() if (HERE / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['dit_mm', 'dit_mm.*']),
    package_data={'dit_mm.accel.cpu': ['csrc/*.cpp']},  # compiled at first use (sparse_ops)
    python_requires='>=3.10',
    install_requires=RUNTIME,
    extras_require={'dev': DEV},
)
