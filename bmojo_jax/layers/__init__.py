"""Flax NNX layers: the mixers, the MLP, and the canonical-form realization."""

from bmojo_jax.layers.attention import MemoryAttention
from bmojo_jax.layers.mlp import SwiGLU
from bmojo_jax.layers.realization import CanonicalRealization
from bmojo_jax.layers.ssm import SSM

__all__ = ["MemoryAttention", "SwiGLU", "CanonicalRealization", "SSM"]
