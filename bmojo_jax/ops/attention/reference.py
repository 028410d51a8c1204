"""The `reference` implementation of `memory_attention`: dense [t, P + t] masks per key group, one
float32 softmax over all of them. The oracle of every other implementation.

Implementation signature (shared by every implementation of the op, see `api`):
    (q [b,t,h,e], k, v [b,P+t,h,e], k_fading, v_fading [b,P+t,h,e] or None,
     memory_positions int [b,c,m] or None, memory_bias float [b,P+t] or None,
     segment_ids int [b,P+t] or None, window (int, or None for full causal attention),
     q_start (int or int32 scalar), return_mass (bool))
        -> out [b,t,h,e] float32, or (out, mass [b,t,3] float32) with return_mass
The arguments are checked by `api`. Also here: `masked_softmax` (shared with `api.attend_one`) and
`group_mass` (shared with `xla`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.config import MASKED_LOGIT  # loads no Pallas module


def masked_softmax(logits, mask):
    """Float32 softmax over the last axis; keys where `mask` is False get zero weight (a finite
    masked logit, so a row with nothing visible can never produce NaN)."""
    return jax.nn.softmax(jnp.where(mask, logits, MASKED_LOGIT), axis=-1)


def group_mass(weights, sizes):
    """Attention mass per key group: weights [..., K] (unnormalised, K = sum(sizes)) ->
    [..., 3] float32 (window, fading, eidetic) summing to 1 over the groups."""
    bounds = np.cumsum([0] + list(sizes))
    mass = jnp.stack([weights[..., a:z].sum(-1) for a, z in zip(bounds[:-1], bounds[1:])], -1)
    return mass / jnp.sum(weights, axis=-1)[..., None]


def memory_attention(q, k, v, kf, vf, memory_positions, memory_bias, segment_ids, window,
                     q_start, return_mass):
    """Dense masks [i, j] per key group (window, fading, eidetic), concatenated along the keys;
    with segment_ids, a key is visible only from a query of its own segment."""
    b, t, h, e = q.shape
    prefix = k.shape[1] - t
    window = prefix + t if window is None else window
    q_pos = q_start + jnp.arange(t)
    k_pos = q_start - prefix + jnp.arange(prefix + t)
    dist = q_pos[:, None] - k_pos[None, :]  # [query i, key j]
    real = (k_pos >= 0)[None, :]
    if segment_ids is not None:  # [b, i, j]: query and key in one segment (document)
        real = real & (segment_ids[:, prefix:, None] == segment_ids[:, None, :])
    groups = [(k, v, (dist >= 0) & (dist < window) & real)]
    if kf is not None:
        groups.append((kf, vf, (dist >= window) & (dist < 2 * window) & real))
    if memory_positions is not None:
        slots = memory_positions[:, jnp.arange(t) // window]  # [b, t, m]: each query's chunk's
        index = jnp.arange(prefix + t)
        groups.append((k, v, jnp.any(slots[:, :, :, None] == index, axis=2) & real))  # [b, i, j]
    q = q.astype(jnp.float32) * e ** -0.5
    logits = [jnp.einsum("bihe,bjhe->bhij", q, keys.astype(jnp.float32)) for keys, _, _ in groups]
    if memory_bias is not None:  # on the eidetic group's logits
        logits[-1] = logits[-1] + memory_bias.astype(jnp.float32)[:, None, None, :]
    logits = jnp.concatenate(logits, -1)
    mask = jnp.concatenate([jnp.broadcast_to(m.reshape((-1, 1) + m.shape[-2:]),
                                             (b, 1) + m.shape[-2:]) for _, _, m in groups], -1)
    values = jnp.concatenate([vals.astype(jnp.float32) for _, vals, _ in groups], 1)
    probs = masked_softmax(logits, mask)
    out = jnp.einsum("bhik,bkhe->bihe", probs, values)
    if not return_mass:
        return out
    keys = prefix + t  # per group: window, fading, eidetic
    sizes = [keys, keys if kf is not None else 0, keys if memory_positions is not None else 0]
    return out, jnp.mean(group_mass(probs, sizes), axis=1)
