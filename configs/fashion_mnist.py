"""fashion_mnist (tfds `fashion_mnist`). Not in the paper's Table 4: our values, following
the MTT/SeqMatch CIFAR-10 settings (N 30, M 2, lr_img 100, lr_lr 1e-5,
lr_teacher 0.01; K 2 at ipc 10 with T+ {20,10}, K 3 at ipc 50), no ZCA.
Variants: ipc=1|10|50, k=N.
"""
from seqmatch_jax import config_lib as common

TABLES = {
    1: {'distill.syn_steps': 50, 'distill.expert_epochs': 2,
        'distill.max_start_epoch': 2, 'distill.lr_img': 100.0,
        'distill.lr_lr': 1e-7, 'distill.lr_teacher': 0.01,
        'seqmatch.num_subsets': 1},
    10: {'distill.syn_steps': 30, 'distill.expert_epochs': 2,
         'distill.max_start_epoch': 20, 'distill.lr_img': 100.0,
         'distill.lr_lr': 1e-5, 'distill.lr_teacher': 0.01,
         'seqmatch.num_subsets': 2, 'seqmatch.max_start_epoch': (20, 10)},
    50: {'distill.syn_steps': 30, 'distill.expert_epochs': 2,
         'distill.max_start_epoch': 40, 'distill.lr_img': 100.0,
         'distill.lr_lr': 1e-5, 'distill.lr_teacher': 0.01,
         'seqmatch.num_subsets': 3, 'seqmatch.max_start_epoch': (20, 20, 10)},
}


def get_config(arg=None):
  return common.table_config('fashion_mnist', arg, TABLES)
