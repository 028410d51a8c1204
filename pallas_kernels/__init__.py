"""Pallas kernels behind the `pallas` implementation of `bmojo_jax.ops` (DESIGN.md section 4).

    memory_attention.memory_attention  fused window + fading + eidetic attention (online softmax).
    ssd.ssd                            chunked Mamba-2 scan, state on chip across an in-kernel
                                       chunk loop.
Both are differentiable through `jax.custom_vjp` with Pallas backward kernels.

Block sizes live in `config` (`AttentionBlocks`, `ScanBlocks`), one default per backend. On CPU the
kernels run with `interpret=True`; on TPU they lower through Mosaic and on GPU through Triton.
This package must not import `bmojo_jax.ops` (which imports it).
"""

from pallas_kernels.config import AttentionBlocks, ScanBlocks

__all__ = ["AttentionBlocks", "ScanBlocks"]
