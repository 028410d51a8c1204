"""The `xla` and `associative` implementations of the selective scans (same signature as
`reference`).

    selective_scan           `xla`: a chunked scan, sequential inside `jax.checkpoint`-ed chunks of
                             q = chunk_size steps (lax.scan speed, ~9x less memory on a 2-core CPU).
    ssd                      `xla`: the SSD chunked-matmul form (Dao & Gu 2024, section 6), ~3.4x
                             faster than lax.scan on a 2-core CPU.
    selective_scan_associative, ssd_associative
                             `associative`: `lax.associative_scan` over affine maps (work for
                             depth; may win on GPU/TPU). ssd via the Mamba-1 layout.
Inside this module q is the number of time steps per chunk (not an axis of the API).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bmojo_jax.ops.ssm import reference


def _pad_time(length, multiple, *arrays):
    """Pads the time axis (1) to a multiple; zero dt makes padded steps identity maps."""
    pad = -length % multiple
    return [jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in arrays]


def selective_scan(x, dt, a, B, C, h0, chunk_size, resets=None):
    """Mamba-1 scan in rematerialised chunks: only the chunk-boundary states are saved."""
    b, t, D = x.shape
    q = min(chunk_size, t)
    inputs = _pad_time(t, q, x, dt, B, C, *([] if resets is None else [resets]))
    chunks = [u.reshape((u.shape[0], u.shape[1] // q, q) + u.shape[2:]) for u in inputs]
    chunks = [jnp.moveaxis(u if u.dtype == bool else u.astype(jnp.float32), (1, 2), (0, 1))
              for u in chunks]  # [c, q, b, ...]

    @jax.checkpoint
    def run_chunk(h, inputs):
        return jax.lax.scan(lambda hh, inp: reference.step(hh, inp, a), h, inputs)

    h_last, y = jax.lax.scan(run_chunk, h0, chunks)
    y = jnp.moveaxis(y, (0, 1), (1, 2)).reshape(b, -1, D)
    return y[:, :t], h_last


def selective_scan_associative(x, dt, a, B, C, h0, chunk_size, resets=None):
    """Mamba-1 scan as a `lax.associative_scan` over the affine maps h -> decay * h + input (a
    new document's first map forgets h: decay 0)."""
    del chunk_size
    x, dt, B, C = (u.astype(jnp.float32) for u in (x, dt, B, C))
    decay = jnp.exp(dt[..., None] * a)  # [b, t, D, n]
    if resets is not None:
        decay = jnp.where(resets[:, :, None, None], 0.0, decay)
    inputs = (dt * x)[..., None] * B[:, :, None, :]
    inputs = inputs.at[:, 0].add(decay[:, 0] * h0)

    def compose(first, second):
        (a1, b1), (a2, b2) = first, second
        return a2 * a1, a2 * b1 + b2

    _, h = jax.lax.associative_scan(compose, (decay, inputs), axis=1)
    return jnp.einsum("btDn,btn->btD", h, C), h[:, -1]


def ssd(x, dt, a, B, C, h0, chunk_size, resets=None):
    """The SSD chunked-matmul form (Dao & Gu 2024, section 6): quadratic attention-like products
    inside chunks of q tokens, a short recurrence over chunk states between them. Packed documents
    (`resets`): every term that would carry state from one document into the next is masked (a
    token reads only earlier tokens, and a chunk only the entering state, of its own document)."""
    b, t, h, p = x.shape
    n = B.shape[-1]
    q = min(chunk_size, t)
    doc = None
    if resets is not None:  # [b, c, q] document index; padded steps join the last document
        doc = jnp.cumsum(resets.astype(jnp.int32), axis=1)
        doc = jnp.pad(doc, [(0, 0), (0, -t % q)], mode="edge").reshape(b, -1, q)
        before = jnp.concatenate([doc[:, :1, :1], doc[:, :-1, -1:]], axis=1)  # token before chunk
    x, dt, B, C = (u.astype(jnp.float32) for u in _pad_time(t, q, x, dt, B, C))
    c = x.shape[1] // q
    x, dt = x.reshape(b, c, q, h, p), dt.reshape(b, c, q, h)
    B, C = B.reshape(b, c, q, n), C.reshape(b, c, q, n)

    log_decay = jnp.cumsum(dt * a, axis=2)  # [b, c, q, h]: log of the decay from chunk start
    xdt = x * dt[..., None]  # [b, c, q, h, p]

    # Inside a chunk: y_i = sum_{j<=i} (C_i . B_j) exp(L_i - L_j) dt_j x_j.
    causal = jnp.tril(jnp.ones((q, q), bool))[None, None, :, :, None]
    if doc is not None:
        causal = causal & (doc[:, :, :, None] == doc[:, :, None, :])[..., None]
    seg = log_decay[:, :, :, None, :] - log_decay[:, :, None, :, :]  # [b, c, i, j, h]
    weights = jnp.exp(jnp.where(causal, seg, -jnp.inf))
    weights = weights * jnp.einsum("bcin,bcjn->bcij", C, B)[..., None]
    y = jnp.einsum("bcijh,bcjhp->bcihp", weights, xdt)

    # State each chunk adds from a zero start, and the decay across a whole chunk.
    to_end = jnp.exp(log_decay[:, :, -1:, :] - log_decay)  # [b, c, q, h]
    chunk_decay = jnp.exp(log_decay[:, :, -1, :])  # [b, c, h]
    entering = jnp.exp(log_decay)  # [b, c, q, h]: decay of the entering state to each token
    if doc is not None:
        to_end = jnp.where((doc == doc[:, :, -1:])[..., None], to_end, 0.0)
        chunk_decay = jnp.where(before == doc[:, :, -1:], chunk_decay, 0.0)
        entering = jnp.where((doc == before)[..., None], entering, 0.0)
    chunk_states = jnp.einsum("bcjn,bcjh,bcjhp->bchpn", B, to_end, xdt)

    def carry(state, inputs):
        added, decay = inputs
        return decay[:, :, None, None] * state + added, state

    h_last, h_start = jax.lax.scan(
        carry, h0, (jnp.swapaxes(chunk_states, 0, 1), jnp.swapaxes(chunk_decay, 0, 1)))
    h_start = jnp.swapaxes(h_start, 0, 1)  # [b, c, h, p, n]: state entering each chunk
    y = y + jnp.einsum("bcin,bchpn,bcih->bcihp", C, h_start, entering)
    return y.reshape(b, c * q, h, p)[:, :t], h_last


ssd_associative = reference.via_mamba1(selective_scan_associative)
