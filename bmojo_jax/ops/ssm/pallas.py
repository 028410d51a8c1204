"""The `pallas` implementation of the selective scans: the thin entry point into `pallas_kernels`.

Imported lazily (`registry.Lazy`) when implementation="pallas" is picked, so that `import bmojo_jax`
loads no Pallas module. Same signature as `reference`; the kernels' tiles are
`pallas_kernels.ScanBlocks` (one default per backend), so `chunk_size` is unused. The kernels
take no packed documents (`resets`): those raise a ValueError pointing to `xla`.
"""

from __future__ import annotations

from pallas_kernels import selective_scan as pallas_selective_scan
from pallas_kernels import ssd as pallas_ssd


def _no_resets(resets):
    if resets is not None:
        raise ValueError("the pallas scans take no segment_ids (packed documents); use "
                         "implementation='xla'.")


def selective_scan(x, dt, a, B, C, h0, chunk_size, resets=None):
    """Mamba-1 scan: `pallas_kernels.selective_scan` (state on chip, in-kernel chunk loop)."""
    del chunk_size
    _no_resets(resets)
    return pallas_selective_scan.selective_scan(x, dt, a, B, C, h0)


def ssd(x, dt, a, B, C, h0, chunk_size, resets=None):
    """Mamba-2 scan: `pallas_kernels.ssd` (SSD chunked form, state on chip)."""
    del chunk_size
    _no_resets(resets)
    return pallas_ssd.ssd(x, dt, a, B, C, h0)
