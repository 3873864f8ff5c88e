"""Analysis of a trained DiT model: its token routing and its cost.

Shared by ``tools/get_flops.py``, ``tools/routing_stats.py`` and
``tools/visualize_routing.py``. Everything runs in eval mode, one image per
batch (each image at its own padded input size, as in inference).

* :mod:`.loading`: configs and models (``load_config``, ``load_model``,
  ``task_of``, ``budget_mu``, the tools' common arguments);
* :mod:`.data`: images and batches (``iter_dataset_images``,
  ``dataset_item``, ``load_image``, ``random_batch``, ``denormalize``);
* :mod:`.flops`: FLOP counting and what it counts (``count_flops``,
  ``count_neck_heads``, ``COUNTING_METHOD``);
* :mod:`.records`: per-image records and their summary (``analyse_batch``,
  ``summarize``, ``routing_stats``);
* :mod:`.routing`: grid nodes, routing switches and masks (``grid_nodes``,
  ``routing_mode``, ``node_masks``).

Every name below is re-exported here: ``from dit_mm import analysis;
analysis.load_model(...)``.
"""
from .data import (
    Batch,
    dataset_item,
    dataset_size,
    denormalize,
    iter_dataset_images,
    load_image,
    random_batch,
)
from .flops import COUNTING_METHOD, count_flops, count_neck_heads, countable_attention
from .loading import (
    SCOPES,
    add_model_args,
    budget_mu,
    check_paths,
    load_config,
    load_model,
    task_of,
)
from .records import ImageRecord, analyse_batch, routing_stats, summarize
from .routing import grid_nodes, node_masks, routing_mode

__all__ = [
    'COUNTING_METHOD',
    'ImageRecord',
    'analyse_batch',
    'SCOPES',
    'budget_mu',
    'count_flops',
    'count_neck_heads',
    'countable_attention',
    'dataset_item',
    'dataset_size',
    'denormalize',
    'grid_nodes',
    'iter_dataset_images',
    'load_config',
    'load_image',
    'load_model',
    'node_masks',
    'random_batch',
    'routing_mode',
    'routing_stats',
    'summarize',
    'task_of',
    'add_model_args',
    'check_paths',
    'Batch',
]
