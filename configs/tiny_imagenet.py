"""Tiny ImageNet (the `tiny-imagenet-200` folder; dataset.data_dir points at it).

ConvNetD4 at 64x64. Variants: ipc=1|10|50, k=N; backbone=datm (DATM /
SeqMatch-DATM, the official DATM rows).
"""
from seqmatch_jax import config_lib
from seqmatch_jax.backbones import datm

BASE = {'model.depth': 4}
TABLES = {
    1: {'mtt.syn_steps': 10, 'mtt.expert_epochs': 2,
        'mtt.max_start_epoch': 10, 'mtt.lr_img': 1e4,
        'mtt.lr_lr': 1e-4, 'mtt.lr_teacher': 0.01,
        'seqmatch.num_subsets': 1},
    # Table 4: K 2, T+ {20,10}, N 20, M 2, batch_syn 100, lr_img 1e4, lr_lr 1e-4.
    10: {'mtt.syn_steps': 20, 'mtt.expert_epochs': 2,
         'mtt.max_start_epoch': 40, 'mtt.lr_img': 1e4,
         'mtt.lr_lr': 1e-4, 'mtt.lr_teacher': 0.01,
         'mtt.batch_syn': 100, 'seqmatch.num_subsets': 2,
         'mtt.per_subset.max_start_epoch': (20, 10)},
    # MTT ipc 50 (batch_syn 300); K 3 as the paper's ipc-50 rule.
    50: {'experts.staged_epochs': 50, 'mtt.syn_steps': 20, 'mtt.expert_epochs': 2,
         'mtt.max_start_epoch': 40, 'mtt.lr_img': 1e4,
         'mtt.lr_lr': 1e-4, 'mtt.lr_teacher': 0.01,
         'mtt.batch_syn': 300, 'seqmatch.num_subsets': 3},
}


# FTD (backbone.name=ftd, --config.experts.optimizer=gsam): Table 7 of Du et
# al. (CVPR 2023) for ipc 1 and 10; ipc 50 is not in it: MTT's ipc-50 values
# with FTD's alpha 1 and EMA 0.999.
TABLES[1].update(config_lib.ftd_row(30, 2, 10, 1e4, 1e-4, 0.01, 1.0, 0.999))
TABLES[10].update(config_lib.ftd_row(20, 2, 40, 1e4, 1e-4, 0.01, 1.0, 0.999,
                                     batch_syn=500, max_start_epoch=(20, 10)))
TABLES[50].update(config_lib.ftd_row(20, 2, 40, 1e4, 1e-4, 0.01, 1.0, 0.999,
                                     batch_syn=300))


# DATM (configs/tiny_imagenet.py:ipc=N,backbone=datm): the official
# configs/TinyImageNet rows (ConvNetD4, 64x64, ZCA); SeqMatch-DATM's K as the
# paper's rule.
DATM_TABLES = {
    1: datm.official_row(syn_steps=40, expert_epochs=2, lr_img=1e4, lr_y=10.0,
                           batch_syn=1000, window=(0, 15, 20), lr_lr=1e-4,
                           expansion_end=2000),
    10: datm.official_row(syn_steps=40, expert_epochs=2, lr_img=100.0,
                            lr_y=10.0, batch_syn=500, window=(10, 50, 50),
                            lr_lr=1e-4, sequential=False, num_subsets=2),
    50: datm.official_row(syn_steps=20, expert_epochs=2, lr_img=100.0,
                            lr_y=10.0, batch_syn=1000, window=(40, 70, 70),
                            lr_lr=1e-4, expansion_end=1, sequential=False,
                            num_subsets=3),
}


def get_config(arg=None):
  return config_lib.table_config('tiny_imagenet', arg, TABLES, BASE,
                                 backbone_tables={'datm': DATM_TABLES})
