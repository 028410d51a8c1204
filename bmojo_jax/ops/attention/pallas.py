"""The `pallas` implementation of `memory_attention`: the thin entry point into
`pallas_kernels.memory_attention` (fused online-softmax kernels, forward and backward).

Imported lazily (`registry.Lazy`) when implementation="pallas" is picked, so that `import bmojo_jax`
loads no Pallas module. Same signature as `reference`; the kernels' tiles are
`pallas_kernels.AttentionBlocks` (one default per backend). The kernels take no key prefix, no
memory_bias, no segment_ids and return no attention mass: those raise a ValueError pointing to
`xla`.
"""

from __future__ import annotations

from pallas_kernels import memory_attention as kernels


def memory_attention(q, k, v, kf, vf, memory_positions, memory_bias, segment_ids, window,
                     q_start, return_mass):
    """`pallas_kernels.memory_attention.memory_attention` with the window resolved (None: t).

    q_start is unused: without a key prefix every key sits at a position >= 0, and the masks
    depend on the distance between query and key only.

    Raises:
      ValueError: return_mass, a memory_bias, segment_ids, or a key prefix (k longer than q).
    """
    del q_start
    if return_mass:
        raise ValueError("memory_attention: the pallas implementation does not return the "
                         "attention mass; use implementation='xla' (diagnostics).")
    if memory_bias is not None:
        raise ValueError("memory_attention: the pallas implementation takes no memory_bias (the "
                         "'learned' eidetic selection); use implementation='xla'.")
    if segment_ids is not None:
        raise ValueError("memory_attention: the pallas implementation takes no segment_ids "
                         "(packed documents); use implementation='xla'.")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"memory_attention: the pallas implementation takes no key prefix (got "
                         f"{k.shape[1] - q.shape[1]} keys before the queries, e.g. from sequence "
                         f"parallelism); use implementation='xla'.")
    return kernels.memory_attention(q, k, v, kf, vf, memory_positions,
                                    q.shape[1] if window is None else window)
