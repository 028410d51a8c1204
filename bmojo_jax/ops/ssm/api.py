"""Selective state-space scans: Mamba-1 (`selective_scan`) and Mamba-2 / SSD (`ssd`).

Notation: b batch, t time, d channels, h heads, p head_dim, n state size, c chunks, q chunk length.

    selective_scan (Mamba-1, decay per channel and state):
        h_t = exp(dt_t[d] * a[d, n]) * h_{t-1} + dt_t[d] x_t[d] B_t[n]       h: [b, d, n]
        y_t[d] = sum_n h_t[d, n] C_t[n]
    ssd (Mamba-2, one scalar decay per head):
        h_t = exp(dt_t[h] * a[h]) * h_{t-1} + dt_t[h] x_t[h, p] B_t[n]       h: [b, h, p, n]
        y_t[h, p] = sum_n h_t[h, p, n] C_t[n]

Both are `(inputs..., h0=None) -> (y, h_last)` so that training, chunked prefill and decoding share
one op. State and accumulation are float32; `y` has the dtype of `x`.

Implementations (DESIGN.md section 4, measured on a 2-core CPU):
    reference    sequential `lax.scan` over time: the oracle.
    xla          ssd: the chunked-matmul SSD form (~3.4x faster than lax.scan on CPU);
                 selective_scan: a chunked scan, sequential inside `jax.checkpoint`-ed chunks
                 (lax.scan speed, ~9x less memory).
    associative  `lax.associative_scan` over affine maps (work for depth; may win on GPU/TPU).
    pallas       `pallas_kernels.ssd`, `.selective_scan`: state on chip, in-kernel chunk loop.
The ssd reference and associative paths reuse the Mamba-1 ones on the broadcast decay, since a
per-head decay is a per-(channel, state) decay with repeated entries.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from bmojo_jax.ops import registry
from pallas_kernels import selective_scan as pallas_scan
from pallas_kernels import ssd as pallas_ssd

DEFAULT_CHUNK = 64


def _check_scan_shapes(x, dt, B, C, h0, state_shape):
    b, t = x.shape[:2]
    if dt.shape != x.shape[: dt.ndim] or B.shape[:2] != (b, t) or C.shape != B.shape:
        raise ValueError(f"Shapes disagree: x {x.shape}, dt {dt.shape}, B {B.shape}, C {C.shape}.")
    if h0 is not None and h0.shape != state_shape:
        raise ValueError(f"h0 has shape {h0.shape}; expected {state_shape}.")


# ----------------------------------------------------------------------------- Mamba-1 layout


def _step(h, inputs, a):
    """One recurrence step. h [b, d, n]; x, dt [b, d]; B, C [b, n]."""
    x, dt, B, C = inputs
    h = jnp.exp(dt[..., None] * a) * h + (dt * x)[..., None] * B[:, None, :]
    return h, jnp.einsum("bdn,bn->bd", h, C)


def _time_major(*arrays):
    return [jnp.swapaxes(a.astype(jnp.float32), 0, 1) for a in arrays]


def _scan_reference(x, dt, a, B, C, h0, chunk_size):
    del chunk_size
    h_last, y = jax.lax.scan(lambda h, inp: _step(h, inp, a), h0, _time_major(x, dt, B, C))
    return jnp.swapaxes(y, 0, 1), h_last


def _pad_time(length, multiple, *arrays):
    """Pads the time axis (1) to a multiple; zero dt makes padded steps identity maps."""
    pad = -length % multiple
    return [jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in arrays]


def _scan_chunked(x, dt, a, B, C, h0, chunk_size):
    b, t, d = x.shape
    q = min(chunk_size, t)
    x, dt, B, C = _pad_time(t, q, x, dt, B, C)
    chunks = [u.reshape((u.shape[0], u.shape[1] // q, q) + u.shape[2:]) for u in (x, dt, B, C)]
    chunks = [jnp.moveaxis(u.astype(jnp.float32), (1, 2), (0, 1)) for u in chunks]  # [c, q, b, ...]

    @jax.checkpoint
    def run_chunk(h, inputs):
        return jax.lax.scan(lambda hh, inp: _step(hh, inp, a), h, inputs)

    h_last, y = jax.lax.scan(run_chunk, h0, chunks)
    y = jnp.moveaxis(y, (0, 1), (1, 2)).reshape(b, -1, d)
    return y[:, :t], h_last


def _scan_associative(x, dt, a, B, C, h0, chunk_size):
    del chunk_size
    x, dt, B, C = (u.astype(jnp.float32) for u in (x, dt, B, C))
    decay = jnp.exp(dt[..., None] * a)  # [b, t, d, n]
    inputs = (dt * x)[..., None] * B[:, :, None, :]
    inputs = inputs.at[:, 0].add(decay[:, 0] * h0)

    def compose(first, second):
        (a1, b1), (a2, b2) = first, second
        return a2 * a1, a2 * b1 + b2

    _, h = jax.lax.associative_scan(compose, (decay, inputs), axis=1)
    return jnp.einsum("btdn,btn->btd", h, C), h[:, -1]


def _scan_pallas(x, dt, a, B, C, h0, chunk_size):
    del chunk_size  # the kernel's tiles are pallas_kernels.ScanBlocks (per backend)
    return pallas_scan.selective_scan(x, dt, a, B, C, h0)


_SELECTIVE_SCAN = {
    "reference": _scan_reference,
    "xla": _scan_chunked,
    "associative": _scan_associative,
    "pallas": _scan_pallas,
}


def selective_scan(x, dt, a, B, C, h0=None, *, chunk_size: int = DEFAULT_CHUNK,
                   implementation: Optional[str] = None):
    """Mamba-1 selective scan (decay per channel and state). Source: Gu & Dao 2023, Alg. 2.

    Args:
      x: [b, t, d] inputs.
      dt: [b, t, d] positive step sizes (after softplus).
      a: [d, n] negative continuous-time decay rates.
      B: [b, t, n] input matrices; C: [b, t, n] output matrices.
      h0: [b, d, n] float32 initial state, or None for zeros.
      chunk_size: chunk length (tokens) of the `xla` chunked scan.
      implementation: None, "reference", "xla", "associative" or "pallas".

    Returns:
      y [b, t, d] (dtype of x) and h_last [b, d, n] float32.

    Raises:
      ValueError: mismatched shapes, or an unavailable implementation.
    """
    b, _, d = x.shape
    n = a.shape[-1]
    _check_scan_shapes(x, dt, B, C, h0, (b, d, n))
    h0 = jnp.zeros((b, d, n), jnp.float32) if h0 is None else h0.astype(jnp.float32)
    fn = registry.pick("selective_scan", _SELECTIVE_SCAN, implementation)
    y, h_last = fn(x, dt, a.astype(jnp.float32), B, C, h0, chunk_size)
    return y.astype(x.dtype), h_last


# ----------------------------------------------------------------------------- Mamba-2 layout


def _as_mamba1(x, dt, a):
    """Rewrites the per-head decay as a per-(channel, state) decay on d = h * p channels."""
    b, t, h, p = x.shape
    return x.reshape(b, t, h * p), jnp.repeat(dt, p, axis=-1), jnp.repeat(a, p)[:, None]


def _ssd_via_mamba1(scan):
    def fn(x, dt, a, B, C, h0, chunk_size):
        b, t, h, p = x.shape
        n = B.shape[-1]
        x1, dt1, a1 = _as_mamba1(x, dt, a)
        y, h_last = scan(x1, dt1, jnp.broadcast_to(a1, (h * p, n)), B, C,
                         h0.reshape(b, h * p, n), chunk_size)
        return y.reshape(b, t, h, p), h_last.reshape(b, h, p, n)
    return fn


def _ssd_chunked(x, dt, a, B, C, h0, chunk_size):
    """The SSD chunked-matmul form (Dao & Gu 2024, section 6): quadratic attention-like products
    inside chunks of q tokens, a short recurrence over chunk states between them."""
    b, t, h, p = x.shape
    n = B.shape[-1]
    q = min(chunk_size, t)
    x, dt, B, C = (u.astype(jnp.float32) for u in _pad_time(t, q, x, dt, B, C))
    c = x.shape[1] // q
    x, dt = x.reshape(b, c, q, h, p), dt.reshape(b, c, q, h)
    B, C = B.reshape(b, c, q, n), C.reshape(b, c, q, n)

    log_decay = jnp.cumsum(dt * a, axis=2)  # [b, c, q, h]: log of the decay from chunk start
    xdt = x * dt[..., None]  # [b, c, q, h, p]

    # Inside a chunk: y_i = sum_{j<=i} (C_i . B_j) exp(L_i - L_j) dt_j x_j.
    causal = jnp.tril(jnp.ones((q, q), bool))[None, None, :, :, None]
    seg = log_decay[:, :, :, None, :] - log_decay[:, :, None, :, :]  # [b, c, i, j, h]
    weights = jnp.exp(jnp.where(causal, seg, -jnp.inf))
    weights = weights * jnp.einsum("bcin,bcjn->bcij", C, B)[..., None]
    y = jnp.einsum("bcijh,bcjhp->bcihp", weights, xdt)

    # State each chunk adds from a zero start, and the decay across a whole chunk.
    to_end = jnp.exp(log_decay[:, :, -1:, :] - log_decay)  # [b, c, q, h]
    chunk_states = jnp.einsum("bcjn,bcjh,bcjhp->bchpn", B, to_end, xdt)
    chunk_decay = jnp.exp(log_decay[:, :, -1, :])  # [b, c, h]

    def carry(state, inputs):
        added, decay = inputs
        return decay[:, :, None, None] * state + added, state

    h_last, h_start = jax.lax.scan(
        carry, h0, (jnp.swapaxes(chunk_states, 0, 1), jnp.swapaxes(chunk_decay, 0, 1)))
    h_start = jnp.swapaxes(h_start, 0, 1)  # [b, c, h, p, n]: state entering each chunk
    y = y + jnp.einsum("bcin,bchpn,bcih->bcihp", C, h_start, jnp.exp(log_decay))
    return y.reshape(b, c * q, h, p)[:, :t], h_last


def _ssd_pallas(x, dt, a, B, C, h0, chunk_size):
    del chunk_size  # the kernel's chunk is pallas_kernels.ScanBlocks.chunk (per backend)
    return pallas_ssd.ssd(x, dt, a, B, C, h0)


_SSD = {
    "reference": _ssd_via_mamba1(_scan_reference),
    "xla": _ssd_chunked,
    "associative": _ssd_via_mamba1(_scan_associative),
    "pallas": _ssd_pallas,
}


def ssd(x, dt, a, B, C, h0=None, *, chunk_size: int = DEFAULT_CHUNK,
        implementation: Optional[str] = None):
    """Mamba-2 selective scan (one scalar decay per head). Source: Dao & Gu 2024 (SSD).

    Args:
      x: [b, t, h, p] inputs.
      dt: [b, t, h] positive step sizes (after softplus).
      a: [h] negative continuous-time decay rates.
      B: [b, t, n] input matrices; C: [b, t, n] output matrices (one group, shared by heads).
      h0: [b, h, p, n] float32 initial state, or None for zeros.
      chunk_size: chunk length (tokens) of the `xla` SSD form.
      implementation: None, "reference", "xla", "associative" or "pallas".

    Returns:
      y [b, t, h, p] (dtype of x) and h_last [b, h, p, n] float32.

    Raises:
      ValueError: mismatched shapes, or an unavailable implementation.
    """
    b, _, h, p = x.shape
    n = B.shape[-1]
    _check_scan_shapes(x, dt, B, C, h0, (b, h, p, n))
    h0 = jnp.zeros((b, h, p, n), jnp.float32) if h0 is None else h0.astype(jnp.float32)
    fn = registry.pick("ssd", _SSD, implementation)
    y, h_last = fn(x, dt, a.astype(jnp.float32), B, C, h0, chunk_size)
    return y.astype(x.dtype), h_last
