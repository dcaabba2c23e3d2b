"""Networks for distillation and evaluation, behind a functional API."""

from seqmatch_jax.models.conv import Conv
from seqmatch_jax.models.conv import conv2d
from seqmatch_jax.models.conv import CONV_IMPLS
from seqmatch_jax.models.conv import Dense
from seqmatch_jax.models.conv import resolve_conv_impl
from seqmatch_jax.models.networks import check_image_size
from seqmatch_jax.models.networks import check_normalization
from seqmatch_jax.models.networks import create_network
from seqmatch_jax.models.networks import MODEL_NAMES
from seqmatch_jax.models.networks import Network
from seqmatch_jax.models.networks import NORMS
from seqmatch_jax.models.networks import Params
from seqmatch_jax.models.networks import single_pixel_norms
from seqmatch_jax.models.networks import State

__all__ = [
    'CONV_IMPLS',
    'Conv',
    'Dense',
    'MODEL_NAMES',
    'NORMS',
    'Network',
    'Params',
    'State',
    'check_image_size',
    'check_normalization',
    'conv2d',
    'create_network',
    'single_pixel_norms',
    'resolve_conv_impl',
]
