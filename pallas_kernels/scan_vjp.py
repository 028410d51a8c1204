"""The custom-VJP wiring shared by the Pallas scans (`ssd`, `selective_scan`).

The forward kernel saves only the state at every chunk boundary; the backward kernel runs the
reverse-time recurrence and recomputes the states inside each chunk from those boundaries, so no
[batch, time, ..., state] tensor is ever saved.
"""

from __future__ import annotations

import functools

import jax


def differentiable_scan(forward, backward):
    """Builds `scan(x, dt, a, B, C, h0, blocks) -> (y, h_last)` with a custom VJP.

    Args:
      forward: `(x, dt, a, B, C, h0, blocks, save_states) -> (y, h_last, boundary states or None)`.
      backward: `(x, dt, a, B, C, states, dy, dh_last, blocks) -> (dx, ddt, da, dB, dC, dh0)`.
    """


    @functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
    def scan(x, dt, a, B, C, h0, blocks):
        y, h_last, _ = forward(x, dt, a, B, C, h0, blocks, save_states=False)
        return y, h_last

    def scan_fwd(x, dt, a, B, C, h0, blocks):
        y, h_last, states = forward(x, dt, a, B, C, h0, blocks, save_states=True)
        return (y, h_last), (x, dt, a, B, C, states)

    def scan_bwd(blocks, residuals, cotangents):
        x, dt, a, B, C, states = residuals
        dy, dh_last = cotangents
        return backward(x, dt, a, B, C, states, dy, dh_last, blocks)

    scan.defvjp(scan_fwd, scan_bwd)
    return scan
