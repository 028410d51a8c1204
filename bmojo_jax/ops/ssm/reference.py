"""The `reference` implementation of the selective scans: a sequential `lax.scan` over time.

The oracle of every other implementation. `ssd` runs the Mamba-1 scan on the broadcast decay, since
a per-head decay is a per-(channel, state) decay with repeated entries (`via_mamba1`).

Implementation signature (shared by every implementation of the op, see `api`):
    selective_scan(x [b,t,D], dt [b,t,D], a [D,n] f32, B [b,t,n], C [b,t,n], h0 [b,D,n] f32,
                   chunk_size, resets bool [b,t] or None) -> (y [b,t,D], h_last [b,D,n] f32)
    ssd(x [b,t,h,p], dt [b,t,h], a [h] f32, B, C, h0 [b,h,p,n] f32, chunk_size, resets)
        -> (y [b,t,h,p], h_last [b,h,p,n] f32)
`resets` (packed documents): True where a document starts; the state is zeroed before it.
y is float32 (or the dtype of x); `api` casts it to the dtype of x.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def step(h, inputs, a):
    """One recurrence step: h [b, D, n]; x, dt [b, D]; B, C [b, n]; optionally reset [b] bool
    -> (h, y [b, D]).

    h_t = exp(dt_t a) * h_{t-1} + dt_t x_t B_t;  y_t = h_t C_t (Gu & Dao 2023, Alg. 2); h_{t-1}
    is zero where reset_t (a new document).
    """
    x, dt, B, C, *reset = inputs
    if reset:
        h = jnp.where(reset[0][:, None, None], 0.0, h)
    h = jnp.exp(dt[..., None] * a) * h + (dt * x)[..., None] * B[:, None, :]
    return h, jnp.einsum("bDn,bn->bD", h, C)


def selective_scan(x, dt, a, B, C, h0, chunk_size, resets=None):
    """Mamba-1 scan, one `lax.scan` step per token (chunk_size unused)."""
    del chunk_size
    time_major = [jnp.swapaxes(u.astype(jnp.float32), 0, 1) for u in (x, dt, B, C)]
    time_major += [] if resets is None else [jnp.swapaxes(resets, 0, 1)]
    h_last, y = jax.lax.scan(lambda h, inp: step(h, inp, a), h0, time_major)
    return jnp.swapaxes(y, 0, 1), h_last


def via_mamba1(scan):
    """An `ssd` implementation from a `selective_scan` one: the per-head decay as a per-(channel,
    state) decay on D = h * p channels."""
    def ssd_fn(x, dt, a, B, C, h0, chunk_size, resets=None):
        b, t, h, p = x.shape
        n = B.shape[-1]
        a1 = jnp.broadcast_to(jnp.repeat(a, p)[:, None], (h * p, n))
        y, h_last = scan(x.reshape(b, t, h * p), jnp.repeat(dt, p, axis=-1), a1, B, C,
                         h0.reshape(b, h * p, n), chunk_size, resets)
        return y.reshape(b, t, h, p), h_last.reshape(b, h, p, n)
    return ssd_fn


ssd = via_mamba1(selective_scan)
