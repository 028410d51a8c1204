"""Causal attention over B'MOJO's memory: in-context window, fading tokens and eidetic slots.

Notation (`bmojo_jax.array_typing`): b batch, t time, h heads, e head_dim, w window (= chunk),
c chunks = ceil(t / w), m eidetic slots, s keys (P + t: a prefix of P tokens, then the queries'
own; or a decode cache).

For a query at position i (in chunk i // w) the visible keys are (docs/design.md section 2):
    in-context  k[j],   v[j]    for i - w < j <= i                  (sliding window; w >= t: full)
    fading      kf[j],  vf[j]   for i - 2w < j <= i - w             (the window just before)
    eidetic     k[p],   v[p]    for p in memory_positions[i // w], p >= 0
and one softmax runs over all of them (the same as partial attentions merged by log-sum-exp).
Sliding-window attention is the case with no fading and no eidetic keys, full causal attention the
case w >= t. RoPE is applied by the caller (`rope`) at each token's true position, so eidetic keys
gathered from `k` keep their original positions.

Implementations (docs/design.md section 4), one module each:
    reference  `reference`: dense [t, t] masks, float32 softmax: the oracle.
    xla        `xla`: block-sparse: queries of chunk c read key chunks c-1, c (window), fading
               chunks c-2, c-1 and m slots; O(t (4w + m) e) work and memory, never a [t, t] mask.
    pallas     `pallas` (imported lazily): `pallas_kernels.memory_attention`, fused
               online-softmax kernels, fwd and bwd (no key prefix, memory_bias or return_mass).
This module checks the arguments and resolves the window (a window covering every key of a plain
window attention is full causal attention: window None).
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from bmojo_jax import array_typing as at
from bmojo_jax.ops import registry
from bmojo_jax.ops.attention import reference, xla

_MEMORY_ATTENTION = {
    "reference": reference.memory_attention,
    "xla": xla.memory_attention,
    "pallas": registry.Lazy("bmojo_jax.ops.attention.pallas", "memory_attention"),
}
IMPLEMENTATIONS = tuple(_MEMORY_ATTENTION)


def rope(x: at.QKV, positions: at.Positions, base: float = 10000.0) -> at.QKV:
    """Rotary position embedding (Su et al. 2021), rotating channel halves (GPT-NeoX layout).

    Args:
      x: [b, t, h, e] queries or keys, e even.
      positions: [t] or [b, t] integer positions (tokens). Concrete (numpy) positions make the
        cos/sin tables compile-time constants.
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


def attend_one(q: at.QueryStep, keys: at.Keys, values: at.Keys, mask: at.KeyMask,
               bias: Optional[at.KeyBias] = None) -> at.QueryStep:
    """Decode-time attention of one query per sequence over a set of cached keys.

    Args:
      q: [b, h, e] query (RoPE applied).
      keys, values: [b, s, h, e] cached keys (RoPE applied) and values.
      mask: [b, s] or [s] bool, True where the key is visible.
      bias: [b, s] float added to the logits (the "learned" eidetic slots' bias), or None.

    Returns:
      [b, h, e] float32.
    """
    e = q.shape[-1]
    logits = jnp.einsum("bhe,bshe->bhs", q.astype(jnp.float32) * e ** -0.5,
                        keys.astype(jnp.float32))
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)[:, None, :]
    mask = jnp.broadcast_to(mask, (q.shape[0], keys.shape[1]))[:, None, :]
    return jnp.einsum("bhs,bshe->bhe", reference.masked_softmax(logits, mask),
                      values.astype(jnp.float32))


def memory_attention(q: at.QKV, k: at.Keys, v: at.Keys, *, window: Optional[int] = None,
                     k_fading: Optional[at.Keys] = None, v_fading: Optional[at.Keys] = None,
                     memory_positions: Optional[at.MemoryPositions] = None,
                     memory_bias: Optional[at.KeyBias] = None,
                     segment_ids: Optional[at.SegmentIds] = None,
                     q_start: Union[int, at.IntScalar] = 0, return_mass: bool = False,
                     implementation: Optional[str] = None
                     ) -> Union[at.QKV, tuple[at.QKV, at.AttentionMass]]:
    """Causal softmax attention over window, fading and eidetic keys (see module docstring).

    Args:
      q: [b, t, h, e] queries (RoPE applied), at positions q_start .. q_start + t - 1.
      k, v: [b, P + t, h, e] keys (RoPE applied) and values: P >= 0 tokens of left context (the
        tokens before the queries, e.g. from earlier sequence shards; P = 0 in a plain forward),
        then the queries' own tokens. Key j sits at position q_start - P + j; keys at negative
        positions are never visible. With a window, P is a multiple of it.
      window: w, in tokens; None = full causal attention.
      k_fading, v_fading: [b, P + t, h, e] keys/values made from the fading (SSM) tokens, or None.
      memory_positions: [b, c, m] int32 eidetic slots per query chunk of w tokens, as indices into
        the key axis (= positions when P = q_start = 0), -1 = empty; or None.
      memory_bias: float [b, P + t], a bias added to the logit of key j when it is read as an
        eidetic slot (the "learned" selection's log sigmoid(score)), or None.
      segment_ids: int [b, P + t], the document of every key (the last t also of every query),
        or None (one document): a key is visible only to the queries of its own document
        (packed documents). A document is a run of equal ids.
      q_start: position of the first query (int, or an int32 scalar under `shard_map`).
      return_mass: also return the attention mass of each query on each key group.
      implementation: None (the backend's default), or one of IMPLEMENTATIONS: "reference",
        "xla", "pallas" (pallas: P = 0, no memory_bias, no segment_ids, no mass).

    Returns:
      [b, t, h, e] float32; with `return_mass`, (that, mass [b, t, 3] float32: the softmax
      weight on the window, fading and eidetic keys, averaged over heads; rows sum to 1).

    Raises:
      ValueError: bad shapes or window, an unavailable implementation, or an argument the
        implementation does not take.
    """
    b, t, h, e = q.shape
    prefix = k.shape[1] - t
    if k.shape[::2] != q.shape[::2] or k.shape[-1] != e or v.shape != k.shape or prefix < 0:
        raise ValueError(f"k, v must be [b, P + t, h, e] for q {q.shape} (P >= 0); got {k.shape}, "
                         f"{v.shape}.")
    if (k_fading is None) != (v_fading is None):
        raise ValueError("Pass both k_fading and v_fading, or neither.")
    if k_fading is not None and (k_fading.shape != k.shape or v_fading.shape != k.shape):
        raise ValueError(f"Fading keys/values must have the keys' shape {k.shape}; got "
                         f"{k_fading.shape}, {v_fading.shape}.")
    if window is not None and window < 1:
        raise ValueError(f"window={window}: must be >= 1 token.")
    if window is None and (memory_positions is not None or k_fading is not None):
        raise ValueError("Fading keys and eidetic slots need a finite window (the chunk size).")
    plain = k_fading is None and memory_positions is None
    if window is not None and plain and window >= t + prefix:
        window = None  # a window that covers every key is full causal attention
    if window is not None and prefix % window:
        raise ValueError(f"{prefix} keys before the queries: must be a multiple of the window "
                         f"{window}.")
    if memory_positions is not None and memory_positions.shape[:2] != (b, -(-t // window)):
        raise ValueError(f"memory_positions has shape {memory_positions.shape}; expected "
                         f"[{b}, {-(-t // window)}, slots] (one row per chunk of {window} tokens).")
    if memory_bias is not None and (memory_positions is None or memory_bias.shape != k.shape[:2]):
        raise ValueError(f"memory_bias must be [b, P + t] = {k.shape[:2]} with memory_positions; "
                         f"got {None if memory_bias is None else memory_bias.shape}.")
    if segment_ids is not None and segment_ids.shape != k.shape[:2]:
        raise ValueError(f"segment_ids must be [b, P + t] = {k.shape[:2]}; got "
                         f"{segment_ids.shape}.")
    fn = registry.pick("memory_attention", _MEMORY_ATTENTION, implementation)
    return fn(q, k, v, k_fading, v_fading, memory_positions, memory_bias, segment_ids, window,
              q_start, return_mass)
