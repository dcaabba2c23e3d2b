"""imagemeow: ImageNet subset, 128x128, SeqMatch per paper Table 4.
Variants: ipc=N, k=N (k=1: plain MTT).
"""
from seqmatch_jax import config_lib


def get_config(arg=None):
  return config_lib.imagenet_subset_config('imagemeow', arg)
