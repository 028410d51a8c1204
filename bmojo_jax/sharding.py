"""Sharded training on a device mesh: the mesh, the parameter sharding rules, batches, multi-host.

The mesh has four named axes (`MESH_AXES`):

    data      batch rows (pure data parallelism: parameters replicated over it)
    fsdp      batch rows too, and parameters / optimizer state split over it (ZeRO-3 / FSDP: XLA
              all-gathers a weight where it is used and reduce-scatters its gradient)
    tensor    attention heads, SSM heads, MLP hidden units and the vocabulary (Megatron style)
    sequence  the time axis of the batch: sequence (context) parallelism for contexts too long
              for one device; the loss runs through `sequence_parallel.
              sequence_parallel_cross_entropy` (the layers receive a `SequenceContext`)

Its shape comes from the training config (`mesh_shape`, (data, fsdp, tensor) or (data, fsdp,
tensor, sequence), one entry may be -1 for "the remaining devices"; default all devices on
`data`, sequence 1). Which parameter is split how is data,
in one place: `PARAM_RULES` maps a regular expression on a parameter's path (the `nnx.state` path
joined by "/", e.g. "blocks/0/mixer/wq/kernel") to the mesh axes of its dimensions. The first rule
that matches wins; a dimension that its axes' total size does not divide is replicated instead (so
any mesh works with any model); unmatched parameters are replicated. The same rules shard the
optimizer state: its leaves' paths end in the parameter paths ("1/0/mu/blocks/0/mixer/wq/kernel").
The train step itself is ordinary `jax.jit` with these shardings as in/out shardings: XLA's SPMD
partitioner inserts every collective.

Our choices:
  * B'MOJO's SSM `in_proj` output is the fused [z | x | B | C | dt] block, which a contiguous split
    over `tensor` would cut across segments (not at head boundaries), so it is split over fsdp only;
    the head-aligned SSM parameters (out_proj's input, A_log, dt_bias, D, mamba1's dt_proj) are
    split over `tensor`. The depthwise conv (channels x|B|C, also fused) and norms are replicated.
  * Batches are split over ("data", "fsdp") jointly; the global batch size must be divisible by
    their product (a clear ValueError otherwise).
  * Only parameters, optimizer state and batches carry shardings; activations are left to XLA's
    sharding propagation (no constraints inside the modules). On some layers it resolves a
    batch-split / head-split conflict by a full reshard (XLA logs "Involuntary full
    rematerialization"): correct, a performance item for real accelerators.

Multi-host: `initialize_distributed` calls `jax.distributed.initialize` (auto-detected on TPU pods,
SLURM, Open MPI, Kubernetes; elsewhere from the environment variables JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID). The batch of step s is a pure function of (s, seed) on every
host; each process keeps the rows of it that its own devices hold (`process_rows`) and the global
array is assembled from the processes' rows (`global_batch`), so the data order is the same on any
number of hosts and any mesh, and a run resumes exactly from a step number.
"""

from __future__ import annotations

import math
import os
import re
from typing import Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bmojo_jax.model import LanguageModel

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
BATCH_AXES = ("data", "fsdp")
SEQUENCE_AXIS = "sequence"

# (regular expression searched in the parameter path, mesh axes of the leading dimensions).
# An entry is a mesh axis name, a tuple of names, or None (replicated); missing trailing entries
# are None. Shapes: nnx.Linear kernels are [in, out], the embedding [vocab, d_model].
PARAM_RULES: tuple[tuple[str, tuple], ...] = (
    (r"(^|/)embed/embedding$", ("tensor", "fsdp")),                    # [V, d]: vocab over tensor
    (r"(^|/)head/kernel$", ("fsdp", "tensor")),                        # untied LM head [d, V]
    (r"mixer/(wq|wk|wv|wk_fading|wv_fading)/kernel$", ("fsdp", "tensor")),  # [d, h*e]: heads
    (r"mixer/wo/kernel$", ("tensor", "fsdp")),                         # [h*e, d]: heads
    (r"mixer/predictor/kernel$", ("fsdp", None)),                      # innovation predictor [d, d]
    (r"(^|/)in_proj/kernel$", ("fsdp", None)),                         # [d, z|x|B|C|dt]: fused
    (r"(^|/)out_proj/kernel$", ("tensor", "fsdp")),                    # [inner, d]: SSM heads
    (r"(^|/)dt_proj/kernel$", (None, "tensor")),                       # mamba1 [rank, inner]
    (r"(^|/)(A_log|dt_bias|D)$", ("tensor",)),                         # per SSM head / channel
    (r"(^|/)conv/(kernel|bias)$", ()),                                 # fused x|B|C channels
    (r"mlp/(gate|up)/kernel$", ("fsdp", "tensor")),                    # [d, hidden]
    (r"mlp/down/kernel$", ("tensor", "fsdp")),                         # [hidden, d]
    (r"(^|/)scale$", ()),                                              # RMSNorm scales
)


# --------------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------------


def resolve_mesh_shape(mesh_shape: Optional[Sequence[int]],
                       num_devices: Optional[int]) -> tuple[int, ...]:
    """(data, fsdp, tensor, sequence) with a -1 entry (at most one) filled so that the product is
    `num_devices`; three entries mean sequence = 1; None means (num_devices, 1, 1, 1). With
    num_devices None only the form is checked (before `jax.distributed.initialize`, when the device
    count is not known yet).

    Raises:
      ValueError: not three or four integers, more than one -1, an entry < 1, or a product that is
        not the device count (the message names both).
    """
    if mesh_shape is None:
        return (num_devices, 1, 1, 1)
    shape = tuple(mesh_shape)
    if len(shape) not in (3, 4) or not all(isinstance(s, (int, np.integer)) and
                                           not isinstance(s, bool) for s in shape):
        raise ValueError(f"mesh_shape={mesh_shape!r}: must be three or four integers "
                         f"({', '.join(MESH_AXES)}; sequence defaults to 1), one of them may "
                         f"be -1.")
    shape = shape + (1,) * (len(MESH_AXES) - len(shape))
    if shape.count(-1) > 1 or any(s < 1 and s != -1 for s in shape):
        raise ValueError(f"mesh_shape={mesh_shape!r}: entries must be >= 1, at most one -1.")
    if num_devices is None:
        return shape
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh_shape={mesh_shape!r}: {num_devices} devices are not divisible "
                             f"by {known}.")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh_shape={mesh_shape!r} needs {math.prod(shape)} devices; there are "
                         f"{num_devices} (jax.device_count()). Use -1 for one axis to take the "
                         f"remaining devices.")
    return tuple(int(s) for s in shape)


def make_mesh(mesh_shape: Optional[Sequence[int]] = None, devices=None) -> Mesh:
    """A mesh with axes `MESH_AXES` over `devices` (default: all devices of all processes).

    Args:
      mesh_shape: (data, fsdp, tensor[, sequence]); see `resolve_mesh_shape`.
      devices: the devices to use (e.g. `jax.devices()[:1]` for a one-device mesh in a process
        that has more); their count must equal the mesh size.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = resolve_mesh_shape(mesh_shape, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# --------------------------------------------------------------------------------------------------
# Parameters and optimizer state
# --------------------------------------------------------------------------------------------------


def path_string(path) -> str:
    """A pytree key path as "a/0/b" (dict keys, sequence indices and attribute names; the
    `value` attribute of nnx Variables is left out)."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name != "value":
                parts.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return "/".join(parts)


def _axes_size(mesh: Mesh, axes) -> int:
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[name] for name in names)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules=PARAM_RULES) -> P:
    """The PartitionSpec of a parameter (or optimizer-state leaf) at `path` with `shape`: the first
    matching rule's axes, each dimension replicated where its axes' size does not divide it."""
    axes: tuple = ()
    for pattern, rule_axes in rules:
        if re.search(pattern, path):
            axes = tuple(rule_axes)
            break
    axes = (axes + (None,) * len(shape))[: len(shape)]
    spec = [a if a is not None and dim % _axes_size(mesh, a) == 0 else None
            for dim, a in zip(shape, axes)]
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def tree_shardings(tree, mesh: Mesh, rules=PARAM_RULES):
    """NamedShardings for every array leaf of `tree` (params: `nnx.state(model, nnx.Param)`, an
    optax state, or their `jax.eval_shape`), by `rules`; scalars are replicated."""
    def sharding(path, leaf):
        shape = getattr(leaf, "shape", ())
        spec = spec_for(path_string(path), shape, mesh, rules) if shape else P()
        return NamedSharding(mesh, spec)
    return jax.tree_util.tree_map_with_path(sharding, tree)


def shard_tree(tree, mesh: Mesh, rules=PARAM_RULES):
    """`tree` placed on the mesh by `tree_shardings` (a copy; the input is untouched)."""
    return jax.device_put(tree, tree_shardings(tree, mesh, rules))


def state_shardings(model_cfg, optimizer, mesh: Mesh, rules=PARAM_RULES):
    """(params, opt_state) NamedSharding trees of a `LanguageModel(model_cfg)`'s `nnx.Param` state
    and of `optimizer.init` on it, computed abstractly (nothing is allocated)."""
    params = nnx.state(nnx.eval_shape(lambda: LanguageModel(model_cfg, rngs=nnx.Rngs(0))),
                       nnx.Param)
    opt_state = jax.eval_shape(optimizer.init, params)
    return tree_shardings(params, mesh, rules), tree_shardings(opt_state, mesh, rules)


def describe(tree, mesh: Mesh, rules=PARAM_RULES) -> list[str]:
    """One line per leaf, "path shape -> spec": what the rules do to a model, for people."""
    lines = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name, shape = path_string(path), tuple(getattr(leaf, "shape", ()))
        lines.append(f"{name} {shape} -> {spec_for(name, shape, mesh, rules)}")
    return lines


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


def batch_sharding(mesh: Mesh, global_batch_size: Optional[int] = None,
                   ndim: int = 2) -> NamedSharding:
    """Rows over ("data", "fsdp"), time (the second dimension, when ndim >= 2) over "sequence",
    the other dimensions replicated.

    Raises:
      ValueError: `global_batch_size` not divisible by data * fsdp.
    """
    size = _axes_size(mesh, BATCH_AXES)
    if global_batch_size is not None and global_batch_size % size:
        raise ValueError(f"batch size {global_batch_size} is not divisible by the mesh's batch "
                         f"axes data * fsdp = {size} (mesh {dict(mesh.shape)}).")
    return NamedSharding(mesh, P(BATCH_AXES, SEQUENCE_AXIS) if ndim >= 2 else P(BATCH_AXES))


def process_rows(mesh: Mesh, global_batch_size: int) -> slice:
    """The rows of the global batch that this process's devices hold (all of them on one host).

    Raises:
      ValueError: the batch does not divide over the mesh, or the process's rows are not one
        contiguous block (a mesh whose device order interleaves hosts along the batch axes).
    """
    sharding = batch_sharding(mesh, global_batch_size, ndim=1)
    index = sharding.addressable_devices_indices_map((global_batch_size,))
    spans = sorted({(s[0].start or 0, global_batch_size if s[0].stop is None else s[0].stop)
                    for s in index.values()})
    start, stop = spans[0][0], max(end for _, end in spans)
    covered = np.zeros(global_batch_size, bool)
    for a, b in spans:
        covered[a:b] = True
    if not covered[start:stop].all():
        raise ValueError(f"this process's batch rows {spans} are not contiguous; use a mesh whose "
                         f"batch axes keep each host's devices together (jax.make_mesh does).")
    return slice(start, stop)


def global_batch(local_arrays, mesh: Mesh, global_batch_size: int):
    """Global jax.Arrays sharded by `batch_sharding` from this process's rows (`process_rows`):
    a pytree of numpy arrays [local rows, ...] -> the same tree of arrays [global rows, ...].
    Each process holds whole sequences: the `sequence` axis must not span hosts (it does not
    when it fits in one host's devices: `jax.make_mesh` keeps a host's devices together on the
    last axes)."""
    def assemble(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(
            batch_sharding(mesh, global_batch_size, x.ndim), x, (global_batch_size,) + x.shape[1:])
    return jax.tree.map(assemble, local_arrays)


def host_batch(batch, mesh: Mesh):
    """The step's global batch (the same numpy arrays [b, ...] on every host, a pure function of
    the step) -> global jax.Arrays, each host transferring only the rows of its own devices."""
    size = len(jax.tree.leaves(batch)[0])
    rows = process_rows(mesh, size)
    return global_batch(jax.tree.map(lambda x: np.asarray(x)[rows], batch), mesh, size)


# --------------------------------------------------------------------------------------------------
# Multi-host
# --------------------------------------------------------------------------------------------------


def initialize_distributed() -> None:
    """`jax.distributed.initialize()` once per process (a no-op when already initialised).

    Clusters that JAX detects (TPU pods, SLURM, Open MPI, Kubernetes) need nothing else. Elsewhere
    set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID
    (0 .. N-1) in each process's environment (see README, "Multi-host training").
    """
    if jax.distributed.is_initialized():
        return
    kwargs = {}
    if "JAX_NUM_PROCESSES" in os.environ:
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if "JAX_PROCESS_ID" in os.environ:
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)


__all__ = ["MESH_AXES", "BATCH_AXES", "SEQUENCE_AXIS", "PARAM_RULES", "resolve_mesh_shape", "make_mesh",
           "replicated", "path_string", "spec_for", "tree_shardings", "shard_tree",
           "state_shardings", "describe", "batch_sharding", "process_rows", "global_batch",
           "host_batch", "initialize_distributed"]
