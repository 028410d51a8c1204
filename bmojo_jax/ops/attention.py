"""Causal attention over B'MOJO's memory: in-context window, fading tokens and eidetic slots.

Notation: b batch, t time, h heads, e head_dim, w window (= chunk), c chunks = ceil(t / w),
m eidetic slots.

For a query at position i (in chunk i // w) the visible keys are (DESIGN.md section 2):
    in-context  k[j],   v[j]    for i - w < j <= i                  (sliding window; w >= t: full)
    fading      kf[j],  vf[j]   for i - 2w < j <= i - w             (the window just before)
    eidetic     k[p],   v[p]    for p in memory_positions[i // w], p >= 0
and one softmax runs over all of them (the same as partial attentions merged by log-sum-exp).
Sliding-window attention is the case with no fading and no eidetic keys, full causal attention the
case w >= t. RoPE is applied by the caller (`rope`) at each token's true position, so eidetic keys
gathered from `k` keep their original positions.

Implementations:
    reference  dense [t, t] masks, float32 softmax: the oracle.
    xla        block-sparse: queries of chunk c read key chunks c-1, c (window), fading chunks
               c-2, c-1 and m slots; O(t (4w + m) e) work and memory, never a [t, t] mask.
    pallas     `pallas_kernels.memory_attention`: fused online-softmax kernels, fwd and bwd.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from bmojo_jax.ops import registry
from pallas_kernels import memory_attention as pallas_attention

_MASKED = -1e30  # finite, so that a row with nothing visible can never produce NaN


def rope(x, positions, base: float = 10000.0):
    """Rotary position embedding (Su et al. 2021), rotating channel halves (GPT-NeoX layout).

    Args:
      x: [b, t, h, e] queries or keys, e even.
      positions: [t] or [b, t] integer positions (tokens).
      base: base frequency.

    Returns:
      [b, t, h, e], dtype of x.
    """
    e = x.shape[-1]
    freqs = (base ** (-np.arange(0, e // 2, dtype=np.float64) * 2.0 / e)).astype(np.float32)
    if isinstance(positions, jax.core.Tracer):
        angles = positions.astype(jnp.float32)[..., None] * freqs  # [(b,) t, e/2]
        cos, sin = jnp.cos(angles), jnp.sin(angles)
    else:  # static positions (the parallel forward): cos/sin become compile-time constants
        angles = np.asarray(positions, np.float32)[..., None] * freqs
        cos, sin = jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))
    if angles.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.astype(x.dtype)


def _gather_slots(k, positions):
    """k [b, t, h, e], positions [b, ..., m] (-1 = empty) -> [b, ..., m, h, e]."""
    return jax.vmap(lambda kb, pb: kb[pb])(k, jnp.maximum(positions, 0))


def _masked_softmax(logits, mask):
    """Float32 softmax over the last axis, keys where `mask` is False get zero weight."""
    return jax.nn.softmax(jnp.where(mask, logits, _MASKED), axis=-1)


def _reference(q, k, v, kf, vf, memory_positions, window):
    b, t, h, e = q.shape
    pos = jnp.arange(t)
    dist = pos[:, None] - pos[None, :]  # [query i, key j]
    groups = [(k, v, (dist >= 0) & (dist < window))]
    if kf is not None:
        groups.append((kf, vf, (dist >= window) & (dist < 2 * window)))
    if memory_positions is not None:
        slots = memory_positions[:, pos // window]  # [b, t, m]: the slots of each query's chunk
        groups.append((k, v, jnp.any(slots[:, :, :, None] == pos, axis=2)))  # [b, i, j]
    q = q.astype(jnp.float32) * e ** -0.5
    logits = jnp.concatenate(
        [jnp.einsum("bihe,bjhe->bhij", q, keys.astype(jnp.float32)) for keys, _, _ in groups], -1)
    mask = jnp.concatenate(
        [jnp.broadcast_to(m.reshape((-1, 1, t, t)), (b, 1, t, t)) for _, _, m in groups], -1)
    values = jnp.concatenate([vals.astype(jnp.float32) for _, vals, _ in groups], 1)
    return jnp.einsum("bhik,bkhe->bihe", _masked_softmax(logits, mask), values)


def _chunks_back(x, offset):
    """x [b, h, c, w, e] -> the chunk `offset` steps earlier for every chunk, zeros before chunk 0."""
    if offset == 0:
        return x
    return jnp.pad(x, [(0, 0), (0, 0), (offset, 0), (0, 0), (0, 0)])[:, :, : x.shape[2]]


def _block_sparse(q, k, v, kf, vf, memory_positions, window):
    """Layout [b, h, c, w, e] (heads outside the chunks, so both einsums are plain batched matmuls
    without transposes in between); keys of all groups concatenated into one [b, h, c, K, e] block
    and one logits matmul; the softmax normalisation is applied after the value matmul (on [.., e]
    instead of [.., K]). Fwd+bwd at b=4, t=2048, h=4, e=64, w=64 on a 2-core CPU: B'MOJO (window,
    fading, 16 slots) 1.4x faster, full causal attention 2.3x faster than the previous per-group
    form."""
    b, t, h, e = q.shape
    f32 = jnp.float32
    c = -(-t // window)
    pad = [(0, 0), (0, c * window - t), (0, 0), (0, 0)]

    def chunked(x):  # [b, t, h, e] -> [b, h, c, w, e] float32
        x = jnp.pad(x.astype(f32), pad).reshape(b, c, window, h, e)
        return jnp.transpose(x, (0, 3, 1, 2, 4))

    qc = chunked(q) * e ** -0.5
    q_pos = jnp.arange(c * window).reshape(c, window)  # [c, w]

    # (keys, values, offsets, visible(distance)) per key group; offsets that point before chunk 0
    # for every chunk (offset >= c) are dropped statically.
    groups = [(k, v, (1, 0), lambda dist: (dist >= 0) & (dist < window))]
    if kf is not None:
        groups.append((kf, vf, (2, 1), lambda dist: (dist >= window) & (dist < 2 * window)))
    keys, values, masks = [], [], []
    for group_k, group_v, offsets, visible in groups:
        offsets = [o for o in offsets if o < c]
        if not offsets:
            continue
        kc, vc = chunked(group_k), chunked(group_v)
        keys += [_chunks_back(kc, o) for o in offsets]
        values += [_chunks_back(vc, o) for o in offsets]
        for o in offsets:
            k_pos = q_pos - o * window  # [c, w]
            dist = q_pos[:, :, None] - k_pos[:, None, :]  # [c, w, w]
            masks.append(visible(dist) & (k_pos >= 0)[:, None, :])
    mask = jnp.concatenate(masks, -1)[None, None]  # [1, 1, c, w, K]
    if memory_positions is not None:
        slot_k = _gather_slots(k, memory_positions).astype(f32)  # [b, c, m, h, e]
        slot_v = _gather_slots(v, memory_positions).astype(f32)
        keys.append(jnp.transpose(slot_k, (0, 3, 1, 2, 4)))
        values.append(jnp.transpose(slot_v, (0, 3, 1, 2, 4)))
        slots = jnp.broadcast_to((memory_positions >= 0)[:, None, :, None, :],
                                 (b, 1, c, window, memory_positions.shape[-1]))
        mask = jnp.concatenate([jnp.broadcast_to(mask, (b,) + mask.shape[1:]), slots], -1)
    keys = keys[0] if len(keys) == 1 else jnp.concatenate(keys, 3)  # [b, h, c, K, e]
    values = values[0] if len(values) == 1 else jnp.concatenate(values, 3)
    logits = jnp.einsum("bhcqe,bhcke->bhcqk", qc, keys)
    if c == 1 and len(masks) == 1:  # full attention: a select fuses best (measured)
        logits = jnp.where(mask, logits, _MASKED)
    else:  # chunked groups: an additive bias fuses best (measured)
        logits = logits + jnp.where(mask, 0.0, _MASKED).astype(f32)
    # Softmax with the normalisation after the value matmul; the max shift is a constant for the
    # gradient (softmax is shift-invariant). A row with nothing visible averages its (masked)
    # values, as a softmax over equal logits would, and never produces NaN.
    weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    out = jnp.einsum("bhcqk,bhcke->bhcqe", weights, values)
    out = out / jnp.sum(weights, axis=-1)[..., None]
    out = jnp.transpose(out, (0, 2, 3, 1, 4))  # [b, c, w, h, e]
    return out.reshape(b, c * window, h, e)[:, :t]


def attend_one(q, keys, values, mask):
    """Decode-time attention of one query per sequence over a set of cached keys.

    Args:
      q: [b, h, e] query (RoPE applied).
      keys, values: [b, k, h, e] cached keys (RoPE applied) and values.
      mask: [b, k] or [k] bool, True where the key is visible.

    Returns:
      [b, h, e] float32.
    """
    e = q.shape[-1]
    logits = jnp.einsum("bhe,bkhe->bhk", q.astype(jnp.float32) * e ** -0.5,
                        keys.astype(jnp.float32))
    mask = jnp.broadcast_to(mask, (q.shape[0], keys.shape[1]))[:, None, :]
    return jnp.einsum("bhk,bkhe->bhe", _masked_softmax(logits, mask), values.astype(jnp.float32))


_IMPLEMENTATIONS = {"reference": _reference, "xla": _block_sparse,
                    "pallas": pallas_attention.memory_attention}


def memory_attention(q, k, v, *, window: Optional[int] = None, k_fading=None, v_fading=None,
                     memory_positions=None, implementation: Optional[str] = None):
    """Causal softmax attention over window, fading and eidetic keys (see module docstring).

    Args:
      q, k, v: [b, t, h, e] queries, keys, values (RoPE already applied to q and k).
      window: w, in tokens; None = full causal attention (w = t).
      k_fading, v_fading: [b, t, h, e] keys/values made from the fading (SSM) tokens, or None.
      memory_positions: [b, c, m] int32 eidetic slot positions per query chunk (-1 = empty), or None.
        Keys/values of the slots are gathered from k and v at those positions.
      implementation: None, "reference", "xla" or "pallas".

    Returns:
      [b, t, h, e] float32.

    Raises:
      ValueError: bad shapes or window, or an unavailable implementation.
    """
    b, t, h, e = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share a shape; got {q.shape}, {k.shape}, {v.shape}.")
    if (k_fading is None) != (v_fading is None):
        raise ValueError("Pass both k_fading and v_fading, or neither.")
    if k_fading is not None and (k_fading.shape != q.shape or v_fading.shape != q.shape):
        raise ValueError(f"Fading keys/values must have shape {q.shape}; got {k_fading.shape}, "
                         f"{v_fading.shape}.")
    if window is None:
        if memory_positions is not None or k_fading is not None:
            raise ValueError("Fading keys and eidetic slots need a finite window (the chunk size).")
        window = t
    if window < 1:
        raise ValueError(f"window={window}: must be >= 1 token.")
    window = min(window, t) if k_fading is None and memory_positions is None else window
    if memory_positions is not None and memory_positions.shape[:2] != (b, -(-t // window)):
        raise ValueError(f"memory_positions has shape {memory_positions.shape}; expected "
                         f"[{b}, {-(-t // window)}, slots] (one row per chunk of {window} tokens).")
    fn = registry.pick("memory_attention", _IMPLEMENTATIONS, implementation)
    return fn(q, k, v, k_fading, v_fading, memory_positions, window)
