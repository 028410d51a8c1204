"""Pallas kernels behind the `pallas` implementation of `bmojo_jax.ops` (docs/design.md section 4).

    memory_attention.memory_attention  fused window + fading + eidetic attention (online softmax).
    ssd.ssd                            chunked Mamba-2 scan, state on chip across an in-kernel
                                       chunk loop.
    selective_scan.selective_scan      Mamba-1 scan (decay per channel and state), state on chip.
All are differentiable through `jax.custom_vjp` with Pallas backward kernels.

Block sizes live in `config` (`AttentionBlocks`, `ScanBlocks`), one default per backend. On CPU the
kernels run with `interpret=True`; on TPU they lower through Mosaic and on GPU through Triton.
`import pallas_kernels` and `pallas_kernels.config` load no Pallas module (only the kernel modules
do), and this package never imports `bmojo_jax`, which imports the kernel modules lazily.
"""

from pallas_kernels.config import AttentionBlocks, ScanBlocks

__all__ = ["AttentionBlocks", "ScanBlocks"]
