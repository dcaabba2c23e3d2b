"""mnist (tfds `mnist`): rows in `config_lib.MNIST_LIKE_TABLES` (not in the
paper's Table 4). Variants: ipc=1|10|50, k=N.
"""
from seqmatch_jax import config_lib


def get_config(arg=None):
  return config_lib.table_config('mnist', arg, config_lib.MNIST_LIKE_TABLES)
