"""Selective state-space scans, Mamba-1 (`selective_scan`) and Mamba-2 / SSD (`ssd`).

One folder per op (docs/design.md section 4):
    api.py        the entry points: argument checks, implementation table, docstrings.
    reference.py  the oracle (sequential `lax.scan`).
    xla.py        the fast XLA implementations (`xla`: chunked; `associative`).
    pallas.py     the thin entry point into `pallas_kernels`, imported only when picked.
    ssm_test.py   one test class over every implementation against the float32 reference.
"""

from bmojo_jax.ops.ssm.api import DEFAULT_CHUNK, IMPLEMENTATIONS, selective_scan, ssd

__all__ = ["DEFAULT_CHUNK", "IMPLEMENTATIONS", "selective_scan", "ssd"]
