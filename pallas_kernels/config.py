"""Block sizes and backend handling shared by the Pallas kernels.

Backends (`jax.default_backend()`):
    tpu  Mosaic TPU, compiled; grid axes are (batch, head[, block]) and all "parallel".
    gpu  Triton, asked for explicitly with `triton.CompilerParams` (a plain `pallas_call` would
         lower to Mosaic GPU in jax 0.10.2); block sizes must be powers of two.
    cpu  the only mode that runs is `interpret=True` (the grid runs sequentially, so the kernels
         keep every time loop inside one program and never carry state across grid steps).

Block sizes are frozen dataclasses with one default per backend; `validate` raises a ValueError
naming the field and the rule: on TPU the block that ends up as the last (lane) axis of a tile must
be a multiple of 128 and one on the second-last (sublane) axis a multiple of 8.

`MASKED_LOGIT` is the finite "minus infinity" of every masked logit, in the kernels and in the XLA
paths of `bmojo_jax`. This module imports no Pallas backend at import time (`compiler_params`
imports the one it needs), so `bmojo_jax` can use it without loading Pallas.

Every program holds the whole time axis of its (batch, head) for the keys/values (attention) or the
inputs (scans) and loops over it in blocks: on GPU those are global-memory refs; on TPU they sit in
VMEM, so very long sequences need a larger `vmem_limit_bytes` (or a manual-DMA variant).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax

BACKENDS = ("cpu", "gpu", "tpu")

# Finite "minus infinity" for masked logits and running maxima (our choice): exp() of it is 0, yet
# a row with nothing visible, or inf - inf, can never produce NaN.
MASKED_LOGIT = -1e30


def backend() -> str:
    """The default JAX backend as one of BACKENDS ("cuda"/"rocm" count as "gpu")."""
    name = jax.default_backend()
    return "gpu" if name in ("gpu", "cuda", "rocm") else name


def interpret(name: Optional[str] = None) -> bool:
    """True where kernels must run in interpret mode (CPU)."""
    return (name or backend()) == "cpu"


def compiler_params(n_grid_axes: int, name: Optional[str] = None):
    """Lowering parameters: Mosaic TPU (parallel grid axes), explicit Triton on GPU, none on CPU."""
    name = name or backend()
    if name == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_grid_axes)
    if name == "gpu":
        from jax.experimental.pallas import triton as pltriton
        return pltriton.CompilerParams(num_warps=4, num_stages=2)
    return None


def _check(name: str, value: int, backend_name: str, lane: bool):
    if value < 1:
        raise ValueError(f"{name}={value}: must be >= 1.")
    if backend_name == "tpu":
        multiple = 128 if lane else 8
        if value % multiple:
            raise ValueError(f"{name}={value}: on TPU it is the {'last' if lane else 'second-last'}"
                             f" axis of a tile and must be a multiple of {multiple}.")
    elif backend_name == "gpu" and (value < 16 or value & (value - 1)):
        raise ValueError(f"{name}={value}: on GPU (Triton) it must be a power of two >= 16.")


@dataclasses.dataclass(frozen=True)
class AttentionBlocks:
    """Tiles of the fused memory-attention kernels.

    Attributes:
      block_q: queries per program (tokens; sublane axis of the logits tile).
      block_k: keys per inner-loop step (tokens; lane axis of the logits tile).
      slot_multiple: the eidetic slot axis m is padded (with empty slots) to a multiple of this.
    """
    block_q: int
    block_k: int
    slot_multiple: int = 1

    def validate(self, backend_name: Optional[str] = None) -> "AttentionBlocks":
        """Returns self; raises ValueError if a size breaks the backend's tiling rules."""
        name = backend_name or backend()
        _check("block_q", self.block_q, name, lane=False)
        _check("block_k", self.block_k, name, lane=True)
        _check("slot_multiple", self.slot_multiple, name, lane=True)
        return self

    @classmethod
    def default(cls, backend_name: Optional[str] = None) -> "AttentionBlocks":
        return _ATTENTION_DEFAULTS[backend_name or backend()]


@dataclasses.dataclass(frozen=True)
class ScanBlocks:
    """Tiles of the chunked scan kernels.

    Attributes:
      chunk: time steps per iteration of the in-kernel chunk loop (tokens; lane axis of the decay
        rows). The state stays on chip across all chunks of one (batch, head) program.
      block_d: channels per program of the Mamba-1 kernel (sublane axis of its [bd, n] state).
    """
    chunk: int
    block_d: int

    def validate(self, backend_name: Optional[str] = None) -> "ScanBlocks":
        """Returns self; raises ValueError if a size breaks the backend's tiling rules."""
        name = backend_name or backend()
        _check("chunk", self.chunk, name, lane=True)
        _check("block_d", self.block_d, name, lane=False)
        return self

    @classmethod
    def default(cls, backend_name: Optional[str] = None) -> "ScanBlocks":
        return _SCAN_DEFAULTS[backend_name or backend()]


# CPU sizes are small so that interpret-mode tests cover several blocks at short lengths.
_ATTENTION_DEFAULTS = {
    "cpu": AttentionBlocks(block_q=16, block_k=16),
    "gpu": AttentionBlocks(block_q=64, block_k=64, slot_multiple=16),
    "tpu": AttentionBlocks(block_q=128, block_k=128, slot_multiple=128),
}
_SCAN_DEFAULTS = {
    "cpu": ScanBlocks(chunk=16, block_d=16),
    "gpu": ScanBlocks(chunk=64, block_d=64),
    "tpu": ScanBlocks(chunk=128, block_d=128),
}


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= value."""
    return -(-value // multiple) * multiple
