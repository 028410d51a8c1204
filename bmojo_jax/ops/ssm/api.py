"""Selective state-space scans: Mamba-1 (`selective_scan`) and Mamba-2 / SSD (`ssd`).

Notation (`bmojo_jax.array_typing`): b batch, t time, D channels of the Mamba-1 scan, h heads,
p head channels, n state size.

    selective_scan (Mamba-1, decay per channel and state):
        h_t = exp(dt_t[D] * a[D, n]) * h_{t-1} + dt_t[D] x_t[D] B_t[n]       h: [b, D, n]
        y_t[D] = sum_n h_t[D, n] C_t[n]
    ssd (Mamba-2, one scalar decay per head):
        h_t = exp(dt_t[h] * a[h]) * h_{t-1} + dt_t[h] x_t[h, p] B_t[n]       h: [b, h, p, n]
        y_t[h, p] = sum_n h_t[h, p, n] C_t[n]

Both are `(inputs..., h0=None) -> (y, h_last)` so that training, chunked prefill and decoding share
one op. State and accumulation are float32; `y` has the dtype of `x`. Packed documents
(`segment_ids`): the state is zeroed before the first token of every document but the first (h0
belongs to the first token's document), so no document reads another's state.

Implementations (docs/design.md section 4, measured on a 2-core CPU), one module each:
    reference    `reference`: sequential `lax.scan` over time: the oracle.
    xla          `xla`: ssd the chunked-matmul SSD form (~3.4x faster than lax.scan on CPU);
                 selective_scan a chunked scan, sequential inside `jax.checkpoint`-ed chunks
                 (lax.scan speed, ~9x less memory).
    associative  `xla`: `lax.associative_scan` over affine maps (work for depth; may win on
                 GPU/TPU).
    pallas       `pallas` (imported lazily): `pallas_kernels.ssd`, `.selective_scan`, state on chip,
                 in-kernel chunk loop.
This module checks the arguments, fills in h0 and casts: the implementations see float32 `a` and
`h0`, and their `y` (float32, or the dtype of x) is cast to the dtype of x here.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from bmojo_jax import array_typing as at
from bmojo_jax.ops import registry
from bmojo_jax.ops.ssm import reference, xla

# Chunk length (tokens) of the `xla` implementations (our choice).
DEFAULT_CHUNK = 64

_SELECTIVE_SCAN = {
    "reference": reference.selective_scan,
    "xla": xla.selective_scan,
    "associative": xla.selective_scan_associative,
    "pallas": registry.Lazy("bmojo_jax.ops.ssm.pallas", "selective_scan"),
}
_SSD = {
    "reference": reference.ssd,
    "xla": xla.ssd,
    "associative": xla.ssd_associative,
    "pallas": registry.Lazy("bmojo_jax.ops.ssm.pallas", "ssd"),
}
IMPLEMENTATIONS = tuple(_SSD)  # both ops have the same ones


def _resets(segment_ids, b: int, t: int):
    """[b, t] bool, True at the first token of every document but the first (None: none)."""
    if segment_ids is None:
        return None
    if segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids has shape {segment_ids.shape}; expected [b, t] = "
                         f"{(b, t)}.")
    return jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], [(0, 0), (1, 0)])


def _check_shapes(x, dt, B, C, h0, state_shape):
    b, t = x.shape[:2]
    if dt.shape != x.shape[: dt.ndim] or B.shape[:2] != (b, t) or C.shape != B.shape:
        raise ValueError(f"Shapes disagree: x {x.shape}, dt {dt.shape}, B {B.shape}, C {C.shape}.")
    if h0 is not None and h0.shape != state_shape:
        raise ValueError(f"h0 has shape {h0.shape}; expected {state_shape}.")


def selective_scan(x: at.ScanInputs, dt: at.ScanInputs, a: at.ScanDecayRates,
                   B: at.SSMProjections, C: at.SSMProjections, h0: Optional[at.ScanState] = None,
                   *, segment_ids: Optional[at.SegmentIds] = None,
                   chunk_size: int = DEFAULT_CHUNK, implementation: Optional[str] = None
                   ) -> tuple[at.ScanInputs, at.ScanState]:
    """Mamba-1 selective scan (decay per channel and state). Source: Gu & Dao 2023, Alg. 2.

    Args:
      x: [b, t, D] inputs.
      dt: [b, t, D] positive step sizes (after softplus).
      a: [D, n] negative continuous-time decay rates.
      B: [b, t, n] input matrices; C: [b, t, n] output matrices.
      h0: [b, D, n] float32 initial state, or None for zeros.
      segment_ids: int [b, t], the document of every token (packed documents; the state
        restarts from zero at each new one), or None.
      chunk_size: chunk length (tokens) of the `xla` chunked scan.
      implementation: None (the backend's default), or one of IMPLEMENTATIONS: "reference",
        "xla", "associative", "pallas" (pallas: no segment_ids).

    Returns:
      y [b, t, D] (dtype of x) and h_last [b, D, n] float32.

    Raises:
      ValueError: mismatched shapes, or an unavailable implementation.
    """
    b, _, channels = x.shape
    n = a.shape[-1]
    _check_shapes(x, dt, B, C, h0, (b, channels, n))
    h0 = jnp.zeros((b, channels, n), jnp.float32) if h0 is None else h0.astype(jnp.float32)
    fn = registry.pick("selective_scan", _SELECTIVE_SCAN, implementation)
    y, h_last = fn(x, dt, a.astype(jnp.float32), B, C, h0, chunk_size,
                   _resets(segment_ids, b, x.shape[1]))
    return y.astype(x.dtype), h_last


def ssd(x: at.SSDInputs, dt: at.SSDStepSizes, a: at.SSDDecayRates, B: at.SSMProjections,
        C: at.SSMProjections, h0: Optional[at.SSDState] = None, *,
        segment_ids: Optional[at.SegmentIds] = None, chunk_size: int = DEFAULT_CHUNK,
        implementation: Optional[str] = None) -> tuple[at.SSDInputs, at.SSDState]:
    """Mamba-2 selective scan (one scalar decay per head). Source: Dao & Gu 2024 (SSD).

    Args:
      x: [b, t, h, p] inputs.
      dt: [b, t, h] positive step sizes (after softplus).
      a: [h] negative continuous-time decay rates.
      B: [b, t, n] input matrices; C: [b, t, n] output matrices (one group, shared by heads).
      h0: [b, h, p, n] float32 initial state, or None for zeros.
      segment_ids: int [b, t], the document of every token (packed documents; the state
        restarts from zero at each new one), or None.
      chunk_size: chunk length (tokens) of the `xla` SSD form.
      implementation: None (the backend's default), or one of IMPLEMENTATIONS: "reference",
        "xla", "associative", "pallas" (pallas: no segment_ids).

    Returns:
      y [b, t, h, p] (dtype of x) and h_last [b, h, p, n] float32.

    Raises:
      ValueError: mismatched shapes, or an unavailable implementation.
    """
    b, _, h, p = x.shape
    n = B.shape[-1]
    _check_shapes(x, dt, B, C, h0, (b, h, p, n))
    h0 = jnp.zeros((b, h, p, n), jnp.float32) if h0 is None else h0.astype(jnp.float32)
    fn = registry.pick("ssd", _SSD, implementation)
    y, h_last = fn(x, dt, a.astype(jnp.float32), B, C, h0, chunk_size,
                   _resets(segment_ids, b, x.shape[1]))
    return y.astype(x.dtype), h_last
