"""What a benchmark ran on, recorded inside every result file."""
from __future__ import annotations

import platform

import torch


def cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = 'cpu') -> dict:
    """CPU, threads, GPU (when ``device`` is CUDA), torch and Python versions."""
    out = dict(cpu=cpu_name(), threads=torch.get_num_threads(), platform=platform.platform(),
               torch=torch.__version__, python=platform.python_version(), device=device)
    if device.startswith('cuda') and torch.cuda.is_available():
        out.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    try:
        import onnxruntime
        out['onnxruntime'] = onnxruntime.__version__
    except ImportError:
        pass
    return out


def write_result(res: dict, out: str | None, name: str) -> str:
    """Writes ``res`` as JSON to ``out``, or to ``benchmarks/results/<name>``."""
    import json
    import os
    path = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', name)
    with open(path, 'w') as f:
        json.dump(res, f, indent=2)
        f.write('\n')
    print(f'wrote {path}')
    return path
