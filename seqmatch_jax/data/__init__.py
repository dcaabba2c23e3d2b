"""Data layer: dataset registry/loaders and pixel <-> model preprocessing."""

from seqmatch_jax.data.datasets import DATASETS
from seqmatch_jax.data.datasets import Dataset
from seqmatch_jax.data.datasets import dataset_names
from seqmatch_jax.data.datasets import IMAGENET_SUBSETS
from seqmatch_jax.data.datasets import load_dataset
from seqmatch_jax.data.datasets import peek_image_shape
from seqmatch_jax.data.datasets import split_validation
from seqmatch_jax.data.preprocess import fit_preprocessor
from seqmatch_jax.data.preprocess import Preprocessor

__all__ = [
    'DATASETS',
    'Dataset',
    'IMAGENET_SUBSETS',
    'Preprocessor',
    'dataset_names',
    'fit_preprocessor',
    'load_dataset',
    'peek_image_shape',
    'split_validation',
]
