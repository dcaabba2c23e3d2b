"""imagefruit: ImageNet subset, 128x128, SeqMatch per paper Table 4. ImageFruit's T+ is {10,10} (Table 4 footnote).
Variants: ipc=N, k=N (k=1: plain MTT).
"""
from seqmatch_jax import config_lib


def get_config(arg=None):
  return config_lib.imagenet_subset_config('imagefruit', arg, max_start_epoch=(10, 10))
