"""Fused B'MOJO memory attention as Pallas kernels (flash-attention style), forward and backward.

Notation: b batch, t time (padded to t'), h heads, e head_dim, w window (= chunk), c chunks =
ceil(t / w), m eidetic slots (padded to m'), bq / bk query / key block, i query and j key positions.

For a query i (docs/design.md section 2) one softmax runs over three key groups:
    window   k[j], v[j]     0 <= i - j < w                (w >= t: full causal attention)
    fading   kf[j], vf[j]   w <= i - j < 2w
    eidetic  ks[i // w, s], vs[i // w, s]   for slots s with memory_positions[i // w, s] >= 0
Masks are computed from positions inside the kernels, never materialised as [t, t].

Forward (grid b x h x t'/bq): one program per query block runs an online softmax (Dao et al. 2022,
FlashAttention, Alg. 1) over only the key blocks that can be visible: window keys in
[i0 - w + 1, i1], fading keys in [i0 - 2w + 1, i1 - w] (i0, i1 the block's first and last query:
these lie in chunks c-1, c and c-2, c-1 when bq <= w), then the slots of the chunks the block spans.
It saves the row log-sum-exp lse [b, h, t'].
Backward (FlashAttention-2, Dao 2023, Alg. 2), P = exp(S - lse), dS = P * (dO V^T - rowsum(dO O)):
    dq kernel     grid over query blocks, loops over the same key blocks:  dQ = dS K
    dkv kernel    grid over key blocks, loops over the query blocks that see them:
                  dK = dS^T Q, dV = P^T dO for the window keys, and for the fading keys
    slot kernel   grid over chunks, loops over the chunk's query blocks: d(slot keys/values).
Slot keys/values are gathered from k, v outside the custom VJP, so autodiff scatters their gradients
back into dk, dv. Accumulation is float32; P and dS are cast to the input dtype (as is dO) for the
matmuls, as in FlashAttention; with float32 inputs everything is float32.

Padding: t is padded to a multiple of bq and bk with zeros. Every real query sees its own key
(distance 0), padded keys lie in the future of every real query, and padded queries carry a zero
cotangent, so padding changes nothing. Empty slots (position -1) and the slot padding are masked.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import config as cfg

_F32 = jnp.float32
_NEG = cfg.MASKED_LOGIT  # masked logits, and the running max before any key


@dataclasses.dataclass(frozen=True)
class _Static:
    """Static (hashable) description of one call."""
    window: int
    fading: bool
    memory: bool
    n_chunks: int  # c = ceil(t / w)
    padded_length: int  # t'
    scale: float
    blocks: cfg.AttentionBlocks

    @property
    def n_q(self):
        return self.padded_length // self.blocks.block_q

    @property
    def n_k(self):
        return self.padded_length // self.blocks.block_k


def _dot(a, b, dims):
    """float32-accumulated matmul contracting axis dims[0] of a with axis dims[1] of b."""
    return lax.dot_general(a, b, (((dims[0],), (dims[1],)), ((), ())),
                           precision=lax.Precision.HIGHEST, preferred_element_type=_F32)


def _positions(start, size, axis):
    """Token positions start..start+size-1 as a column [size, 1] (axis 0) or a row [1, size]."""
    shape = (size, 1) if axis == 0 else (1, size)
    return start + lax.broadcasted_iota(jnp.int32, shape, axis)


def _div(a, b):
    """Integer a // b for a >= 0, b > 0 (truncating division: floor division of signed integers
    does not lower on every TPU generation)."""
    return lax.div(jnp.asarray(a, jnp.int32), jnp.int32(b))


def _cdiv(a, b):
    return _div(a + b - 1, b)


# Which key blocks a query block [q0, q0 + bq) visits, and which query blocks see a key block
# [k0, k0 + bk): (first, end) block indices, end exclusive, for distances in [lo, hi] = the group.
def _key_blocks(q0, st, lo, hi):
    bk = st.blocks.block_k
    first = _div(jnp.maximum(q0 - hi, 0), bk)
    end = jnp.minimum(_cdiv(jnp.maximum(q0 + st.blocks.block_q - lo, 0), bk), st.n_k)
    return first, end


def _query_blocks(k0, st, lo, hi):
    bq = st.blocks.block_q
    return _div(k0 + lo, bq), jnp.minimum(_div(k0 + st.blocks.block_k - 1 + hi, bq) + 1, st.n_q)


def _groups(st):
    """(name, min distance, max distance) of the positional key groups."""
    groups = [("window", 0, st.window - 1)]
    if st.fading:
        groups.append(("fading", st.window, 2 * st.window - 1))
    return groups


def _slot_chunks(q0, st):
    """Chunks whose slots the query block [q0, q0 + bq) reads: [first, end)."""
    return _div(q0, st.window), jnp.minimum(_div(q0 + st.blocks.block_q - 1, st.window) + 1,
                                            st.n_chunks)


def _unpack(refs, st):
    """Splits input refs into {'window': (k, v), 'fading': (kf, vf), 'slots': (ks, vs, pos)}."""
    refs = list(refs)
    named = {"window": (refs.pop(0), refs.pop(0))}
    if st.fading:
        named["fading"] = (refs.pop(0), refs.pop(0))
    if st.memory:
        named["slots"] = (refs.pop(0), refs.pop(0), refs.pop(0))
    return named, refs


# ----------------------------------------------------------------------------- forward


def _forward_kernel(q_ref, *refs, st: _Static):
    named, (o_ref, lse_ref) = _unpack(refs, st)
    bq, bk = st.blocks.block_q, st.blocks.block_k
    q0 = pl.program_id(2) * bq
    q = q_ref[...]
    q_pos = _positions(q0, bq, 0)

    def attend(carry, logits, visible, values):
        m, l, acc = carry
        logits = jnp.where(visible, logits * st.scale, _NEG)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1, keepdims=True))
        p = jnp.where(visible, jnp.exp(logits - m_new), 0.0)
        alpha = jnp.exp(m - m_new)
        return (m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True),
                alpha * acc + _dot(p.astype(values.dtype), values, (1, 0)))

    carry = (jnp.full((bq, 1), _NEG, _F32), jnp.zeros((bq, 1), _F32),
             jnp.zeros(q.shape, _F32))
    for name, lo, hi in _groups(st):
        k_ref, v_ref = named[name]

        def key_block(kb, carry, k_ref=k_ref, v_ref=v_ref, lo=lo, hi=hi):
            k0 = pl.multiple_of(kb * bk, bk)
            dist = q_pos - _positions(k0, bk, 1)
            return attend(carry, _dot(q, k_ref[pl.ds(k0, bk), :], (1, 1)),
                          (dist >= lo) & (dist <= hi), v_ref[pl.ds(k0, bk), :])

        carry = lax.fori_loop(*_key_blocks(q0, st, lo, hi), key_block, carry)
    if st.memory:
        ks_ref, vs_ref, pos_ref = named["slots"]

        def chunk_slots(ci, carry):
            visible = (_div(q_pos, st.window) == ci) & (pos_ref[ci] >= 0)
            return attend(carry, _dot(q, ks_ref[ci], (1, 1)), visible, vs_ref[ci])

        carry = lax.fori_loop(*_slot_chunks(q0, st), chunk_slots, carry)
    m, l, acc = carry
    o_ref[...] = acc / l
    lse_ref[...] = m + jnp.log(l)


# ----------------------------------------------------------------------------- backward


def _probs_and_dlogits(logits, visible, lse, do, values, delta, st):
    """P = exp(S - lse) on visible keys and dS = P * (dO V^T - delta), both [bq, keys] float32."""
    p = jnp.where(visible, jnp.exp(jnp.where(visible, logits * st.scale, _NEG) - lse), 0.0)
    return p, p * (_dot(do, values, (1, 1)) - delta)


def _dq_kernel(q_ref, *refs, st: _Static):
    named, (do_ref, lse_ref, delta_ref, dq_ref) = _unpack(refs, st)
    bq, bk = st.blocks.block_q, st.blocks.block_k
    q0 = pl.program_id(2) * bq
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_pos = _positions(q0, bq, 0)

    def add(dq, logits, visible, keys, values):
        _, ds = _probs_and_dlogits(logits, visible, lse, do, values, delta, st)
        return dq + _dot(ds.astype(keys.dtype), keys, (1, 0))

    dq = jnp.zeros(q.shape, _F32)
    for name, lo, hi in _groups(st):
        k_ref, v_ref = named[name]

        def key_block(kb, dq, k_ref=k_ref, v_ref=v_ref, lo=lo, hi=hi):
            k0 = pl.multiple_of(kb * bk, bk)
            dist = q_pos - _positions(k0, bk, 1)
            keys = k_ref[pl.ds(k0, bk), :]
            return add(dq, _dot(q, keys, (1, 1)), (dist >= lo) & (dist <= hi), keys,
                       v_ref[pl.ds(k0, bk), :])

        dq = lax.fori_loop(*_key_blocks(q0, st, lo, hi), key_block, dq)
    if st.memory:
        ks_ref, vs_ref, pos_ref = named["slots"]

        def chunk_slots(ci, dq):
            visible = (_div(q_pos, st.window) == ci) & (pos_ref[ci] >= 0)
            return add(dq, _dot(q, ks_ref[ci], (1, 1)), visible, ks_ref[ci], vs_ref[ci])

        dq = lax.fori_loop(*_slot_chunks(q0, st), chunk_slots, dq)
    dq_ref[...] = dq * st.scale


def _key_grads(carry, q_ref, do_ref, lse_ref, delta_ref, q0, keys, values, visible_fn, st):
    """Adds one query block's contribution to (dK, dV) of a block of keys."""
    dk, dv = carry
    bq = st.blocks.block_q
    rows = pl.ds(q0, bq)
    q, do = q_ref[rows, :], do_ref[rows, :]
    p, ds = _probs_and_dlogits(_dot(q, keys, (1, 1)), visible_fn(_positions(q0, bq, 0)),
                               lse_ref[rows, :], do, values, delta_ref[rows, :], st)
    return (dk + _dot(ds.astype(q.dtype), q, (0, 0)),
            dv + _dot(p.astype(do.dtype), do, (0, 0)))


def _dkv_kernel(q_ref, *refs, st: _Static):
    named, outs = _unpack(refs, st)
    do_ref, lse_ref, delta_ref = outs[:3]
    grad_refs = outs[3:]  # dk, dv[, dkf, dvf]
    bq, bk = st.blocks.block_q, st.blocks.block_k
    k0 = pl.program_id(2) * bk
    k_pos = _positions(k0, bk, 1)
    for gi, (name, lo, hi) in enumerate(_groups(st)):
        k_ref, v_ref = named[name]
        keys, values = k_ref[...], v_ref[...]

        def query_block(qb, carry, keys=keys, values=values, lo=lo, hi=hi):
            def visible(q_pos):
                dist = q_pos - k_pos
                return (dist >= lo) & (dist <= hi)
            return _key_grads(carry, q_ref, do_ref, lse_ref, delta_ref,
                              pl.multiple_of(qb * bq, bq), keys, values, visible, st)

        zeros = jnp.zeros(keys.shape, _F32)
        dk, dv = lax.fori_loop(*_query_blocks(k0, st, lo, hi), query_block, (zeros, zeros))
        grad_refs[2 * gi][...] = dk * st.scale
        grad_refs[2 * gi + 1][...] = dv


def _slot_kernel(q_ref, ks_ref, vs_ref, pos_ref, do_ref, lse_ref, delta_ref, dks_ref, dvs_ref, *,
                 st: _Static):
    bq = st.blocks.block_q
    ci = pl.program_id(2)
    keys, values = ks_ref[...], vs_ref[...]
    filled = pos_ref[...] >= 0  # [1, m']

    def query_block(qb, carry):
        def visible(q_pos):
            return (_div(q_pos, st.window) == ci) & filled
        return _key_grads(carry, q_ref, do_ref, lse_ref, delta_ref, pl.multiple_of(qb * bq, bq),
                          keys, values, visible, st)

    first = _div(ci * st.window, bq)
    end = jnp.minimum(_div((ci + 1) * st.window - 1, bq) + 1, st.n_q)
    zeros = jnp.zeros(keys.shape, _F32)
    dks, dvs = lax.fori_loop(first, end, query_block, (zeros, zeros))
    dks_ref[...] = dks * st.scale
    dvs_ref[...] = dvs


# ----------------------------------------------------------------------------- pallas_calls


def _whole(*shape):
    """BlockSpec of the whole [*shape] slice of one (batch, head) on a (b, h, block) grid."""
    return pl.BlockSpec((None, None) + shape, lambda i, j, k: (i, j) + (0,) * len(shape))


def _tiled(block, e):
    """BlockSpec of block `k` of `block` tokens of a [b, h, t', e] array."""
    return pl.BlockSpec((None, None, block, e), lambda i, j, k: (i, j, k, 0))


def _key_specs(st, e, m):
    """Specs of the key/value inputs after q: positional groups whole, then the slots."""
    tp = st.padded_length
    specs = [_whole(tp, e)] * (4 if st.fading else 2)
    if st.memory:
        specs += [_whole(st.n_chunks, m, e)] * 2
        specs.append(pl.BlockSpec((None, st.n_chunks, 1, m), lambda i, j, k: (i, 0, 0, 0)))
    return specs


def _call(kernel, st, grid, in_specs, out_specs, out_shape, name):
    return pl.pallas_call(functools.partial(kernel, st=st), grid=grid, in_specs=in_specs,
                          out_specs=out_specs, out_shape=out_shape, interpret=cfg.interpret(),
                          compiler_params=cfg.compiler_params(len(grid)), name=name)


def _key_inputs(kl, vl, kfl, vfl, ks, vs, pos, st):
    return [kl, vl] + ([kfl, vfl] if st.fading else []) + ([ks, vs, pos] if st.memory else [])


def _forward(q, kv, st):
    """q [b, h, t', e] and kernel-layout key inputs -> o [b, h, t', e] f32, lse [b, h, t', 1]."""
    b, h, tp, e = q.shape
    bq = st.blocks.block_q
    m = kv[-1].shape[-1] if st.memory else 0
    return _call(_forward_kernel, st, (b, h, st.n_q), [_tiled(bq, e)] + _key_specs(st, e, m),
                 [_tiled(bq, e), _tiled(bq, 1)],
                 [jax.ShapeDtypeStruct((b, h, tp, e), _F32),
                  jax.ShapeDtypeStruct((b, h, tp, 1), _F32)], "memory_attention_forward")(q, *kv)


def _backward(q, kv, o, lse, do, st):
    """Kernel-layout inputs, forward outputs and dO [b, h, t', e] -> dq, [dk, dv(, dkf, dvf)] and
    [d(slot keys), d(slot values)] (None without slots), all float32 in kernel layout."""
    b, h, tp, e = q.shape
    bq, bk = st.blocks.block_q, st.blocks.block_k
    m = kv[-1].shape[-1] if st.memory else 0
    delta = jnp.sum(do * o, axis=-1, keepdims=True)  # [b, h, t', 1]
    row_stats = [do, lse, delta]
    row_specs = [_tiled(bq, e), _tiled(bq, 1), _tiled(bq, 1)]
    dq = _call(_dq_kernel, st, (b, h, st.n_q), [_tiled(bq, e)] + _key_specs(st, e, m) + row_specs,
               _tiled(bq, e), jax.ShapeDtypeStruct(q.shape, _F32),
               "memory_attention_dq")(q, *kv, *row_stats)
    n_pos = 4 if st.fading else 2
    pos_st = dataclasses.replace(st, memory=False)
    dkv = _call(_dkv_kernel, pos_st, (b, h, st.n_k),
                [_whole(tp, e)] + [_tiled(bk, e)] * n_pos + [_whole(tp, e), _whole(tp, 1),
                                                              _whole(tp, 1)],
                [_tiled(bk, e)] * n_pos, [jax.ShapeDtypeStruct(q.shape, _F32)] * n_pos,
                "memory_attention_dkv")(q, *kv[:n_pos], *row_stats)
    dslots = [None, None]
    if st.memory:
        slot = pl.BlockSpec((None, None, None, m, e), lambda i, j, k: (i, j, k, 0, 0))
        dslots = _call(_slot_kernel, st, (b, h, st.n_chunks),
                       [_whole(tp, e), slot, slot,
                        pl.BlockSpec((None, None, 1, m), lambda i, j, k: (i, k, 0, 0)),
                        _whole(tp, e), _whole(tp, 1), _whole(tp, 1)],
                       [slot, slot], [jax.ShapeDtypeStruct(kv[-3].shape, _F32)] * 2,
                       "memory_attention_slots")(q, *kv[-3:], *row_stats)
    return dq, dkv, dslots


# ----------------------------------------------------------------------------- custom VJP


def _to_kernel(x, st):
    """[b, t, h, e] -> [b, h, t', e], zero-padded in time."""
    x = jnp.pad(x, [(0, 0), (0, st.padded_length - x.shape[1]), (0, 0), (0, 0)])
    return jnp.swapaxes(x, 1, 2)


def _from_kernel(x, t, dtype):
    """[b, h, t', e] -> [b, t, h, e] in `dtype`."""
    return jnp.swapaxes(x, 1, 2)[:, :t].astype(dtype)


def _prepare(q, k, v, kf, vf, ks, vs, pos, st):
    """Op-layout inputs -> kernel-layout q and the list of key inputs the kernels take."""
    kv = [_to_kernel(x.astype(q.dtype), st) if x is not None else None for x in (k, v, kf, vf)]
    slots = ([jnp.moveaxis(x.astype(q.dtype), 3, 1) for x in (ks, vs)] + [pos[:, :, None, :]]
             if st.memory else [None] * 3)  # [b, h, c, m', e] twice, [b, c, 1, m']
    return _to_kernel(q, st), _key_inputs(*kv, *slots, st)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _attention(q, k, v, kf, vf, ks, vs, pos, st):
    o, _ = _forward(*_prepare(q, k, v, kf, vf, ks, vs, pos, st), st)
    return _from_kernel(o, q.shape[1], _F32)


def _attention_fwd(q, k, v, kf, vf, ks, vs, pos, st):
    ql, kv = _prepare(q, k, v, kf, vf, ks, vs, pos, st)
    o, lse = _forward(ql, kv, st)
    inputs = (q, k, v, kf, vf, ks, vs, pos)
    return _from_kernel(o, q.shape[1], _F32), (inputs, o, lse)


def _attention_bwd(st, residuals, do):
    inputs, o, lse = residuals
    q, k, v, kf, vf, ks, vs, pos = inputs
    ql, kv = _prepare(*inputs, st)
    dq, dkv, (dks, dvs) = _backward(ql, kv, o, lse, _to_kernel(do.astype(q.dtype), st), st)
    t = q.shape[1]
    grads = [_from_kernel(dq, t, q.dtype)]
    grads += [_from_kernel(g, t, x.dtype) for g, x in zip(dkv, (k, v, kf, vf))]
    grads += [None] * (4 - len(dkv))
    grads += ([jnp.moveaxis(g, 1, 3).astype(x.dtype) for g, x in zip((dks, dvs), (ks, vs))]
              if st.memory else [None, None])
    return tuple(grads) + (None,)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _gather_slots(x, positions):
    """x [b, t, h, e], positions [b, c, m'] (-1 = empty) -> [b, c, m', h, e] (autodiff: scatter)."""
    return jax.vmap(lambda xb, pb: xb[pb])(x, jnp.maximum(positions, 0))


def memory_attention(q, k, v, k_fading, v_fading, memory_positions, window: int, *,
                     blocks: Optional[cfg.AttentionBlocks] = None):
    """Causal attention over window, fading and eidetic keys with fused Pallas kernels.

    The `pallas` implementation of `bmojo_jax.ops.memory_attention` (same positional arguments as
    its registry, window resolved: full causal attention is window = t); differentiable through a
    custom VJP whose backward is Pallas kernels too.

    Args:
      q, k, v: [b, t, h, e] queries, keys, values (RoPE already applied), float32 or bfloat16.
      k_fading, v_fading: [b, t, h, e] fading keys/values, or None (both or neither).
      memory_positions: [b, c, m] int32 eidetic slot positions per chunk of `window` tokens
        (c = ceil(t / window), -1 = empty), or None.
      window: w >= 1, in tokens.
      blocks: tile sizes (`AttentionBlocks`); None = the backend's default.

    Returns:
      [b, t, h, e] float32.

    Raises:
      ValueError: block sizes that break the backend's tiling rules, or a bad window.
    """
    if window < 1:
        raise ValueError(f"window={window}: must be >= 1 token.")
    blocks = (blocks or cfg.AttentionBlocks.default()).validate()
    b, t, h, e = q.shape
    st = _Static(window=window, fading=k_fading is not None, memory=memory_positions is not None,
                 n_chunks=-(-t // window),
                 padded_length=cfg.round_up(t, math.lcm(blocks.block_q, blocks.block_k)),
                 scale=e ** -0.5, blocks=blocks)
    ks = vs = pos = None
    if st.memory:
        m = memory_positions.shape[-1]
        pad = cfg.round_up(m, blocks.slot_multiple) - m
        pos = jnp.pad(memory_positions.astype(jnp.int32), [(0, 0), (0, 0), (0, pad)],
                      constant_values=-1)
        ks, vs = _gather_slots(k, pos), _gather_slots(v, pos)
    return _attention(q, k, v, k_fading, v_fading, ks, vs, pos, st)
