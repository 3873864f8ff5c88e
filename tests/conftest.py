"""Shared fixtures: small DiT models on tiny inputs, deterministic seeds."""
import pytest
import torch

import dit_mm  # noqa: F401  (registers DiT and the hook)

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_dit(arch: str = 'b0', **kwargs) -> 'dit_mm.DiT':
    """A randomly initialised DiT (PVTv2 init)."""
    model = dit_mm.DiT(arch=arch, **kwargs)
    model.init_weights()
    return model


def spread_gates(model, scale: float = 2.0) -> None:
    """Random gate weights (and EMA copies) so that gates keep different
    numbers of tokens per image instead of all or none."""
    with torch.no_grad():
        for g in list(model.row_gates.values()) + list(model.col_gates.values()):
            g.proj.weight.normal_(0, scale / g.proj.weight.shape[1] ** 0.5)
            g.proj.bias.zero_()
            g.reset_ema()


@pytest.fixture(scope='module')
def one_thread():
    """One torch thread for a module's tests (they build many small models,
    where a second thread only adds synchronisation)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def toy_root(tmp_path_factory):
    """A small generated toy data set (COCO + ADE-style), shared by tests."""
    from dit_mm.datasets.toy_data import generate_toy_dataset
    root = tmp_path_factory.mktemp('toy')
    generate_toy_dataset(root, num_train=6, num_val=3, image_size=(128, 160), seed=0)
    return root
