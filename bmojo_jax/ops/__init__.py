"""Pure-function ops with `reference` and fast implementations behind one entry point each."""

from bmojo_jax.ops.attention import attend_one, memory_attention, rope
from bmojo_jax.ops.cross_entropy import linear_cross_entropy
from bmojo_jax.ops.eidetic import chunk_topk, select_eidetic, select_whole_state
from bmojo_jax.ops.ssm import selective_scan, ssd

__all__ = ["attend_one", "memory_attention", "rope", "linear_cross_entropy", "chunk_topk",
           "select_eidetic", "select_whole_state", "selective_scan", "ssd"]
