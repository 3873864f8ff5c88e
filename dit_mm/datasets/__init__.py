"""Synthetic toy data sets that the ``*_toy.py`` configs train and test on
(``tools/make_toy_data.py``).

* :mod:`.toy_data`: shapes on photographs, as COCO instances and ADE-style
  semantic masks (detection, segmentation);
* :mod:`.toy_classification`: one textured object per image, in
  mmpretrain's ``CustomDataset`` layout (classification).
"""
from .toy_classification import generate_toy_classification
from .toy_data import generate_toy_dataset

__all__ = ['generate_toy_dataset', 'generate_toy_classification']
