"""Chunked SSD (Mamba-2 selective scan) as Pallas kernels, forward and backward.

Notation: b batch, t time, h heads, p head_dim, n state size, q chunk, c chunks (t padded to c q),
i, j, k positions inside a chunk (i the output step, j the input step).

    recurrence     S_t = exp(dt_t a) S_{t-1} + dt_t x_t B_t^T            S: [p, n] per (b, h)
                   y_t = S_t C_t
    per chunk      L_i = sum_{k<=i} dt_k a                                 log decay from its start
                   D_ij = [j <= i] exp(L_i - L_j)                          [q, q]
                   y    = (D * (C B^T) * dt_j) x + exp(L_i) C S0^T          S0 = state entering it
                   S1   = exp(L_q) S0 + (exp(L_q - L_j) dt_j x_j)^T B
Source: Dao & Gu 2024 ("Transformers are SSMs", section 6, the SSD chunked form).

One program per (batch, head) keeps S on chip in float32 across a `lax.fori_loop` over the c chunks;
the grid holds only those independent axes, so no state crosses grid steps. The forward saves the
state entering every chunk ([b, h, c, p, n], not a per-step [b, t, h, p, n] tensor). The backward
runs the chunks in reverse time: from the saved S0 it recomputes the chunk, and carries the adjoint
state G = dLoss/dS, from the cotangent of h_last, with G0 = exp(L_q) G1 + (exp(L_i) dy_i)^T C.
The gradient with respect to the log decays L becomes the gradients of dt and a outside the kernel.

Measured on one H200 (results/performance_gpu.md, b 2, t 8192, h 16, p 64, n 64, bfloat16): right
to bfloat16 rounding, but 13x slower than the `xla` SSD forward and 48x forward + backward. With
b x h programs (32 on 132 multiprocessors) each walking its chunks in order, the chip is mostly
idle; the `xla` form runs every chunk's [q, q] products at once and only the small state pass in
order. A fast GPU kernel needs that split (intra-chunk work parallel over chunks, then the state
pass); until then, use `scan_implementation="xla"` beside `implementation="pallas"` (that pair is
not measured yet as a whole model).

Padding: t is padded to a multiple of q with dt = 0 (identity steps: no decay, no input), so the
final state is exact. B and C are shared by all heads: the backward returns per-head dB, dC and sums
them.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import config as cfg
from pallas_kernels.scan_vjp import differentiable_scan

_F32 = jnp.float32


def _dot(a, b, dims):
    """float32-accumulated matmul contracting axis dims[0] of a with axis dims[1] of b."""
    return lax.dot_general(a, b, (((dims[0],), (dims[1],)), ((), ())),
                           precision=lax.Precision.HIGHEST, preferred_element_type=_F32)


def _iota(q):
    return (lax.broadcasted_iota(jnp.int32, (q, q), 0), lax.broadcasted_iota(jnp.int32, (q, q), 1))


def _to_col(row):
    """[1, q] -> [q, 1] as a masked lane reduction (a transpose without relayout constraints)."""
    rows, cols = _iota(row.shape[1])
    return jnp.sum(jnp.where(rows == cols, row, 0.0), axis=1, keepdims=True)


def _to_row(col):
    """[q, 1] -> [1, q]."""
    rows, cols = _iota(col.shape[0])
    return jnp.sum(jnp.where(rows == cols, col, 0.0), axis=0, keepdims=True)


def _decays(dta_row):
    """Log decays of one chunk: L as a column [q, 1], and D [q, q] (see top)."""
    rows, cols = _iota(dta_row.shape[1])
    log_col = jnp.sum(jnp.where(cols <= rows, dta_row, 0.0), axis=1, keepdims=True)
    log_row = _to_row(log_col)
    causal = cols <= rows
    decay = jnp.where(causal, jnp.exp(jnp.where(causal, log_col - log_row, cfg.MASKED_LOGIT)), 0.0)
    return log_col, decay


def _load_chunk(refs, start, chunk):
    """x [q, p], dt and dt*a rows [1, q], B and C [q, n] of the chunk at `start`, as float32."""
    x_ref, dt_ref, dta_ref, b_ref, c_ref = refs
    rows = pl.ds(start, chunk)
    return (x_ref[rows, :].astype(_F32), dt_ref[:, rows].astype(_F32),
            dta_ref[:, rows].astype(_F32), b_ref[rows, :].astype(_F32),
            c_ref[rows, :].astype(_F32))


def _forward_kernel(x_ref, dt_ref, dta_ref, b_ref, c_ref, h0_ref, y_ref, h_last_ref, *states_ref,
                    chunk: int, n_chunks: int):
    def body(ci, state):
        start = pl.multiple_of(ci * chunk, chunk)
        x, dt, dta, bm, cm = _load_chunk((x_ref, dt_ref, dta_ref, b_ref, c_ref), start, chunk)
        if states_ref:
            states_ref[0][ci] = state
        log_col, decay = _decays(dta)
        y = (_dot(decay * _dot(cm, bm, (1, 1)) * dt, x, (1, 0))
             + jnp.exp(log_col) * _dot(cm, state, (1, 1)))
        y_ref[pl.ds(start, chunk), :] = y.astype(y_ref.dtype)
        log_end = jnp.sum(dta, axis=1, keepdims=True)  # [1, 1]: L_q
        weights = jnp.exp(log_end - log_col) * _to_col(dt)  # [q, 1]
        return jnp.exp(log_end) * state + _dot(weights * x, bm, (0, 0))

    h_last_ref[...] = lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(_F32))


def _backward_kernel(x_ref, dt_ref, dta_ref, b_ref, c_ref, states_ref, dy_ref, dh_last_ref,
                     dx_ref, ddt_ref, dlog_ref, db_ref, dc_ref, dh0_ref, *, chunk: int,
                     n_chunks: int):
    def body(r, grad):  # grad = G, dLoss/d(state leaving the chunk), [p, n]
        ci = n_chunks - 1 - r
        start = pl.multiple_of(ci * chunk, chunk)
        rows = pl.ds(start, chunk)
        x, dt, dta, bm, cm = _load_chunk((x_ref, dt_ref, dta_ref, b_ref, c_ref), start, chunk)
        dy = dy_ref[rows, :].astype(_F32)
        state = states_ref[ci]  # S0 [p, n], saved by the forward
        log_col, decay = _decays(dta)
        log_end = jnp.sum(dta, axis=1, keepdims=True)
        dt_col = _to_col(dt)
        to_end = jnp.exp(log_end - log_col)  # [q, 1]
        from_start = jnp.exp(log_col)  # [q, 1]
        cb = _dot(cm, bm, (1, 1))  # [i, j] C_i . B_j
        dyx = _dot(dy, x, (1, 1))  # [i, j] dy_i . x_j
        bg = _dot(bm, grad, (1, 1))  # [j, p] (G B_j)
        dx_raw = _dot(decay * cb, dy, (0, 0)) + to_end * bg  # [j, p] = (dLoss/dS_j) B_j
        dx_ref[rows, :] = (dt_col * dx_raw).astype(dx_ref.dtype)
        ddt_ref[:, rows] = _to_row(jnp.sum(x * dx_raw, axis=1, keepdims=True))
        db_ref[rows, :] = dt_col * (_dot(decay * dyx, cm, (0, 0)) + to_end * _dot(x, grad, (1, 0)))
        dc_ref[rows, :] = (_dot(decay * dyx * dt, bm, (1, 0))
                           + from_start * _dot(dy, state, (1, 0)))
        # dLoss/dL_i: L_i enters D_i. (+, row i) and D_.i (-, column i), exp(L_i) S0 and
        # exp(L_q - L_i) in S1 (-), and L_q through exp(L_q) S0 and every exp(L_q - L_j) (+).
        prod = decay * cb * dt * dyx  # [i, j]
        from_inputs = to_end * dt_col * jnp.sum(x * bg, axis=1, keepdims=True)  # [q, 1]
        end = jnp.exp(log_end) * jnp.sum(grad * state) + jnp.sum(from_inputs)
        is_end = lax.broadcasted_iota(jnp.int32, (1, chunk), 1) == chunk - 1
        dlog = (jnp.sum(prod, axis=1, keepdims=True)
                + from_start * jnp.sum(dy * _dot(cm, state, (1, 1)), axis=1, keepdims=True)
                - from_inputs
                + _to_col(jnp.where(is_end, end, 0.0) - jnp.sum(prod, axis=0, keepdims=True)))
        # d(dt_k a) = sum_{i >= k} dLoss/dL_i, as a row.
        rows_i, cols_k = _iota(chunk)
        dlog_ref[:, rows] = jnp.sum(jnp.where(rows_i >= cols_k, dlog, 0.0), axis=0, keepdims=True)
        return jnp.exp(log_end) * grad + _dot(from_start * dy, cm, (0, 0))

    dh0_ref[...] = lax.fori_loop(0, n_chunks, body, dh_last_ref[...].astype(_F32))


# ----------------------------------------------------------------------------- wrappers


def _pad_time(u, padded_length):
    """Pads axis 1 (time) with zeros to `padded_length`."""
    return jnp.pad(u, [(0, 0), (0, padded_length - u.shape[1])] + [(0, 0)] * (u.ndim - 2))


def _layout(x, dt, a, B, C, chunk):
    """Kernel layout: time padded to a multiple of the chunk (dt = 0 there), heads before time.

    Returns x [b, h, t', p], dt and dt * a as rows [b, h, 1, t'], B and C [b, t', n].
    """
    tp = cfg.round_up(x.shape[1], chunk)
    dt_rows = jnp.swapaxes(_pad_time(dt.astype(_F32), tp), 1, 2)[:, :, None, :]
    return (jnp.swapaxes(_pad_time(x, tp), 1, 2), dt_rows, dt_rows * a[None, :, None, None],
            _pad_time(B, tp), _pad_time(C, tp))


def _per_head(*tail):
    """BlockSpec of one (batch, head) slice of a [b, h, *tail] array on the (b, h) grid."""
    return pl.BlockSpec((None, None) + tail, lambda i, j: (i, j) + (0,) * len(tail))


def _input_specs(tp, p, n):
    shared = pl.BlockSpec((None, tp, n), lambda i, j: (i, 0, 0))  # B, C: one copy for all heads
    return [_per_head(tp, p), _per_head(1, tp), _per_head(1, tp), shared, shared]


def _forward(x, dt, a, B, C, h0, blocks, save_states):
    b, t, h, p = x.shape
    n = B.shape[-1]
    chunk = blocks.chunk
    x_l, dt_l, dta_l, B_l, C_l = _layout(x, dt, a, B, C, chunk)
    tp = x_l.shape[2]
    n_chunks = tp // chunk
    in_specs = _input_specs(tp, p, n)
    out_shape = [jax.ShapeDtypeStruct((b, h, tp, p), x.dtype),
                 jax.ShapeDtypeStruct((b, h, p, n), _F32)]
    out_specs = [_per_head(tp, p), _per_head(p, n)]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((b, h, n_chunks, p, n), _F32))
        out_specs.append(_per_head(n_chunks, p, n))
    outs = pl.pallas_call(
        functools.partial(_forward_kernel, chunk=chunk, n_chunks=n_chunks),
        grid=(b, h), in_specs=in_specs + [_per_head(p, n)], out_specs=out_specs,
        out_shape=out_shape, interpret=cfg.interpret(), compiler_params=cfg.compiler_params(2),
        name="ssd_forward",
    )(x_l, dt_l, dta_l, B_l, C_l, h0)
    y = jnp.swapaxes(outs[0], 1, 2)[:, :t]
    return y, outs[1], (outs[2] if save_states else None)


def _backward(x, dt, a, B, C, states, dy, dh_last, blocks):
    b, t, h, p = x.shape
    n = B.shape[-1]
    chunk = blocks.chunk
    x_l, dt_l, dta_l, B_l, C_l = _layout(x, dt, a, B, C, chunk)
    tp = x_l.shape[2]
    n_chunks = tp // chunk
    dy_l = jnp.swapaxes(_pad_time(dy, tp), 1, 2)
    head_rows = _per_head(1, tp)
    dx, ddt, dlog, dB, dC, dh0 = pl.pallas_call(
        functools.partial(_backward_kernel, chunk=chunk, n_chunks=n_chunks),
        grid=(b, h),
        in_specs=_input_specs(tp, p, n) + [_per_head(n_chunks, p, n), _per_head(tp, p),
                                           _per_head(p, n)],
        out_specs=[_per_head(tp, p), head_rows, head_rows, _per_head(tp, n), _per_head(tp, n),
                   _per_head(p, n)],
        out_shape=[jax.ShapeDtypeStruct((b, h, tp, p), _F32),
                   jax.ShapeDtypeStruct((b, h, 1, tp), _F32),
                   jax.ShapeDtypeStruct((b, h, 1, tp), _F32),
                   jax.ShapeDtypeStruct((b, h, tp, n), _F32),
                   jax.ShapeDtypeStruct((b, h, tp, n), _F32),
                   jax.ShapeDtypeStruct((b, h, p, n), _F32)],
        interpret=cfg.interpret(), compiler_params=cfg.compiler_params(2), name="ssd_backward",
    )(x_l, dt_l, dta_l, B_l, C_l, states, dy_l, dh_last)
    ddt, dlog = ddt[:, :, 0, :t], dlog[:, :, 0, :t]  # [b, h, t]
    dt_bht = jnp.swapaxes(dt.astype(_F32), 1, 2)
    return (jnp.swapaxes(dx, 1, 2)[:, :t].astype(x.dtype),
            jnp.swapaxes(ddt + a[None, :, None] * dlog, 1, 2).astype(dt.dtype),
            jnp.sum(dt_bht * dlog, axis=(0, 2)),
            jnp.sum(dB, axis=1)[:, :t].astype(B.dtype),
            jnp.sum(dC, axis=1)[:, :t].astype(C.dtype),
            dh0)


_ssd = differentiable_scan(_forward, _backward)


def ssd(x, dt, a, B, C, h0=None, *, blocks: Optional[cfg.ScanBlocks] = None):
    """Mamba-2 selective scan (SSD) with Pallas kernels; differentiable (custom VJP).

    Args:
      x: [b, t, h, p] inputs (float32 or bfloat16).
      dt: [b, t, h] positive step sizes (after softplus).
      a: [h] negative continuous-time decay rates.
      B, C: [b, t, n] input and output matrices, shared by the heads.
      h0: [b, h, p, n] initial state (float32), or None for zeros.
      blocks: tile sizes (`ScanBlocks`, only `chunk` is used); None = the backend's default.

    Returns:
      y [b, t, h, p] (dtype of x) and h_last [b, h, p, n] float32.

    Raises:
      ValueError: block sizes that break the backend's tiling rules.
    """
    blocks = (blocks or cfg.ScanBlocks.default()).validate()
    b, _, h, p = x.shape
    n = B.shape[-1]
    h0 = jnp.zeros((b, h, p, n), _F32) if h0 is None else h0.astype(_F32)
    return _ssd(x, dt, a.astype(_F32), B, C, h0, blocks)
