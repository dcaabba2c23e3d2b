"""imagefruit (ImageNet subset, 128x128, ConvNetD5): SeqMatch per paper Table 4.

K 2, N 20, M 2, batch_syn 20, lr_img 1e5, lr_lr 1e-6, lr_teacher 0.01; ImageFruit's T+ is {10,10} (Table 4 footnote).
Variants: ipc=N, k=N (k=1: plain MTT).
"""
from seqmatch_jax import config_lib as common

BASE = {'model.depth': 5}
TABLES = {
    10: {'distill.syn_steps': 20, 'distill.expert_epochs': 2,
         'distill.max_start_epoch': 10, 'distill.lr_img': 1e5,
         'distill.lr_lr': 1e-6, 'distill.lr_teacher': 0.01,
         'distill.batch_syn': 20, 'seqmatch.num_subsets': 2,
         'seqmatch.max_start_epoch': (10, 10)},
}


def get_config(arg=None):
  return common.table_config('imagefruit', arg, TABLES, BASE)
