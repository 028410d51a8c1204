"""Mamba-1 selective scan (decay per channel and state) as Pallas kernels, forward and backward.

Notation: b batch, t time (padded to t' = c q), d channels (padded to a multiple of bd), n state,
q chunk, c chunks, bd channels per program, s a time step.

    h_s = exp(dt_s a) * h_{s-1} + (dt_s x_s) B_s^T          h: [d, n] per batch element
    y_s = h_s C_s
Source: Gu & Dao 2023 (Mamba), Alg. 2.

The decay differs per (channel, state), so there is no matmul form: each program (one batch element,
one block of bd channels) keeps h [bd, n] on chip in float32 and steps through time with a
`lax.fori_loop` over the c chunks, each a `lax.fori_loop` over its q steps. The grid holds only the
independent (batch, channel-block) axes. The forward saves the state entering every chunk
[b, c, d, n]. The backward walks the chunks in reverse: it recomputes the chunk's q states from the
saved one into a per-program workspace (an extra, discarded output of q states [q, bd, n]), then
runs the adjoint recurrence backwards in time, lam = dLoss/dh_s:
    lam += dy_s C_s^T;   dx_s = dt_s lam B_s;   dB_s = lam^T (dt_s x_s);   dC_s = h_s^T dy_s
    ddt_s = sum_n lam (a exp(dt_s a) h_{s-1} + x_s B_s^T);   da += lam dt_s exp(dt_s a) h_{s-1}
    lam <- exp(dt_s a) lam                                   (dh0 = lam after step 0)
dB and dC are summed over channel blocks outside the kernel.

Padding: time with dt = 0 (identity steps), channels with x = dt = a = 0; both are sliced off.
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


def _step_inputs(x_ref, dt_ref, b_ref, c_ref, s):
    """Step s: x, dt as columns [bd, 1], B, C as rows [1, n], float32."""
    step = pl.ds(s, 1)
    return (x_ref[:, step].astype(_F32), dt_ref[:, step].astype(_F32),
            b_ref[step, :].astype(_F32), c_ref[step, :].astype(_F32))


def _forward_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, h0_ref, y_ref, h_last_ref, *states_ref,
                    chunk: int, n_chunks: int):
    a = a_ref[...]

    def run_chunk(ci, h):
        if states_ref:
            states_ref[0][ci] = h

        def step(k, h):
            s = ci * chunk + k
            x, dt, bm, cm = _step_inputs(x_ref, dt_ref, b_ref, c_ref, s)
            h = jnp.exp(dt * a) * h + (dt * x) * bm
            y_ref[:, pl.ds(s, 1)] = jnp.sum(h * cm, axis=1, keepdims=True).astype(y_ref.dtype)
            return h

        return lax.fori_loop(0, chunk, step, h)

    h_last_ref[...] = lax.fori_loop(0, n_chunks, run_chunk, h0_ref[...].astype(_F32))


def _backward_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, states_ref, dy_ref, dh_last_ref,
                     dx_ref, ddt_ref, da_ref, db_ref, dc_ref, dh0_ref, work_ref, *, chunk: int,
                     n_chunks: int):
    a = a_ref[...]

    def run_chunk(r, carry):
        lam, da = carry
        ci = n_chunks - 1 - r

        def replay(k, h):  # work_ref[k] = h_{s-1}, the state before step s = ci q + k
            work_ref[k] = h
            x, dt, bm, _ = _step_inputs(x_ref, dt_ref, b_ref, c_ref, ci * chunk + k)
            return jnp.exp(dt * a) * h + (dt * x) * bm

        h_end = lax.fori_loop(0, chunk, replay, states_ref[ci])

        def step_back(j, carry):
            lam, da, h = carry  # h = h_s
            k = chunk - 1 - j
            s = ci * chunk + k
            x, dt, bm, cm = _step_inputs(x_ref, dt_ref, b_ref, c_ref, s)
            dy = dy_ref[:, pl.ds(s, 1)].astype(_F32)  # [bd, 1]
            h_prev = work_ref[k]
            decay = jnp.exp(dt * a)
            lam = lam + dy * cm
            dc_ref[pl.ds(s, 1), :] = jnp.sum(h * dy, axis=0, keepdims=True)
            db_ref[pl.ds(s, 1), :] = jnp.sum(lam * (dt * x), axis=0, keepdims=True)
            lam_b = jnp.sum(lam * bm, axis=1, keepdims=True)  # [bd, 1]
            dx_ref[:, pl.ds(s, 1)] = (dt * lam_b).astype(dx_ref.dtype)
            decayed = lam * decay * h_prev
            ddt_ref[:, pl.ds(s, 1)] = jnp.sum(decayed * a, axis=1, keepdims=True) + x * lam_b
            return decay * lam, da + decayed * dt, h_prev

        lam, da, _ = lax.fori_loop(0, chunk, step_back, (lam, da, h_end))
        return lam, da

    lam, da = lax.fori_loop(0, n_chunks, run_chunk,
                            (dh_last_ref[...].astype(_F32), jnp.zeros(a.shape, _F32)))
    dh0_ref[...] = lam
    da_ref[...] = da


# ----------------------------------------------------------------------------- wrappers


def _pad(u, axis, size):
    pads = [(0, 0)] * u.ndim
    pads[axis] = (0, size - u.shape[axis])
    return jnp.pad(u, pads)


def _channels_first(u, tp, dp):
    """[b, t, d] -> [b, d', t'], zero-padded."""
    return jnp.swapaxes(_pad(_pad(u, 1, tp), 2, dp), 1, 2)


def _layout(x, dt, a, B, C, blocks):
    """Kernel layout: x, dt [b, d', t'] (channels before time), a [d', n], B, C [b, t', n]."""
    tp = cfg.round_up(x.shape[1], blocks.chunk)
    dp = cfg.round_up(x.shape[2], blocks.block_d)
    return (_channels_first(x, tp, dp), _channels_first(dt.astype(_F32), tp, dp), _pad(a, 0, dp),
            _pad(B, 1, tp), _pad(C, 1, tp))


def _specs(tp, n, bd, n_chunks):
    """BlockSpecs on the (batch, channel block) grid."""
    channels = pl.BlockSpec((None, bd, tp), lambda i, j: (i, j, 0))
    shared = pl.BlockSpec((None, tp, n), lambda i, j: (i, 0, 0))
    return dict(
        channels=channels, shared=shared,
        a=pl.BlockSpec((bd, n), lambda i, j: (j, 0)),
        state=pl.BlockSpec((None, bd, n), lambda i, j: (i, j, 0)),
        states=pl.BlockSpec((None, n_chunks, bd, n), lambda i, j: (i, 0, j, 0)),
        per_block=lambda *tail: pl.BlockSpec((None, None) + tail,
                                             lambda i, j: (i, j) + (0,) * len(tail)))


def _forward(x, dt, a, B, C, h0, blocks, save_states):
    b, t, d = x.shape
    n = a.shape[-1]
    bd, chunk = blocks.block_d, blocks.chunk
    x_l, dt_l, a_l, B_l, C_l = _layout(x, dt, a, B, C, blocks)
    dp, tp = x_l.shape[1], x_l.shape[2]
    n_chunks = tp // chunk
    sp = _specs(tp, n, bd, n_chunks)
    out_specs = [sp["channels"], sp["state"]]
    out_shape = [jax.ShapeDtypeStruct((b, dp, tp), x.dtype), jax.ShapeDtypeStruct((b, dp, n), _F32)]
    if save_states:
        out_specs.append(sp["states"])
        out_shape.append(jax.ShapeDtypeStruct((b, n_chunks, dp, n), _F32))
    outs = pl.pallas_call(
        functools.partial(_forward_kernel, chunk=chunk, n_chunks=n_chunks),
        grid=(b, dp // bd),
        in_specs=[sp["channels"], sp["channels"], sp["a"], sp["shared"], sp["shared"],
                  sp["state"]],
        out_specs=out_specs, out_shape=out_shape, interpret=cfg.interpret(),
        compiler_params=cfg.compiler_params(2), name="selective_scan_forward",
    )(x_l, dt_l, a_l, B_l, C_l, _pad(h0, 1, dp))
    y = jnp.swapaxes(outs[0], 1, 2)[:, :t, :d]
    return y, outs[1][:, :d], (outs[2] if save_states else None)


def _backward(x, dt, a, B, C, states, dy, dh_last, blocks):
    b, t, d = x.shape
    n = a.shape[-1]
    bd, chunk = blocks.block_d, blocks.chunk
    x_l, dt_l, a_l, B_l, C_l = _layout(x, dt, a, B, C, blocks)
    dp, tp = x_l.shape[1], x_l.shape[2]
    n_chunks, n_blocks = tp // chunk, dp // bd
    dy_l = _channels_first(dy, tp, dp)
    sp = _specs(tp, n, bd, n_chunks)
    shape = lambda *s: jax.ShapeDtypeStruct(s, _F32)  # noqa: E731
    dx, ddt, da, dB, dC, dh0, _ = pl.pallas_call(
        functools.partial(_backward_kernel, chunk=chunk, n_chunks=n_chunks),
        grid=(b, n_blocks),
        in_specs=[sp["channels"], sp["channels"], sp["a"], sp["shared"], sp["shared"],
                  sp["states"], sp["channels"], sp["state"]],
        out_specs=[sp["channels"], sp["channels"], sp["per_block"](bd, n),
                   sp["per_block"](tp, n), sp["per_block"](tp, n), sp["state"],
                   sp["per_block"](chunk, bd, n)],
        out_shape=[shape(b, dp, tp), shape(b, dp, tp), shape(b, n_blocks, bd, n),
                   shape(b, n_blocks, tp, n), shape(b, n_blocks, tp, n), shape(b, dp, n),
                   shape(b, n_blocks, chunk, bd, n)],
        interpret=cfg.interpret(), compiler_params=cfg.compiler_params(2),
        name="selective_scan_backward",
    )(x_l, dt_l, a_l, B_l, C_l, states, dy_l, _pad(dh_last, 1, dp))

    def back(u, dtype):  # [b, d', t'] -> [b, t, d]
        return jnp.swapaxes(u, 1, 2)[:, :t, :d].astype(dtype)

    return (back(dx, x.dtype), back(ddt, dt.dtype),
            jnp.sum(da, axis=0).reshape(dp, n)[:d],
            jnp.sum(dB, axis=1)[:, :t].astype(B.dtype), jnp.sum(dC, axis=1)[:, :t].astype(C.dtype),
            dh0[:, :d])


_scan = differentiable_scan(_forward, _backward)


def selective_scan(x, dt, a, B, C, h0=None, *, blocks: Optional[cfg.ScanBlocks] = None):
    """Mamba-1 selective scan with Pallas kernels; differentiable (custom VJP).

    Args:
      x: [b, t, d] inputs (float32 or bfloat16).
      dt: [b, t, d] positive step sizes (after softplus).
      a: [d, n] negative continuous-time decay rates.
      B, C: [b, t, n] input and output matrices.
      h0: [b, d, n] initial state (float32), or None for zeros.
      blocks: tile sizes (`ScanBlocks`: `chunk` steps per saved state, `block_d` channels per
        program); None = the backend's default.

    Returns:
      y [b, t, d] (dtype of x) and h_last [b, d, n] float32.

    Raises:
      ValueError: block sizes that break the backend's tiling rules.
    """
    blocks = (blocks or cfg.ScanBlocks.default()).validate()
    b, _, d = x.shape
    n = a.shape[-1]
    h0 = jnp.zeros((b, d, n), _F32) if h0 is None else h0.astype(_F32)
    return _scan(x, dt, a.astype(_F32), B, C, h0, blocks)
