"""Checkpoints of a training workdir: the orbax wrapper the training loop saves and restores with
(`Checkpoints`, `CheckpointError`), and the readers for evaluation and notebooks
(`load_checkpoint`, `load_model`).

A checkpoint is `<workdir>/checkpoints/<step>/` with the orbax items `params` (the `nnx.Param`
state), `opt_state` (the optax state) and `meta` (JSON: step, config, model). The readers build the
model abstractly (`abstract_model`: no random initialisation) and restore into that structure.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from bmojo_jax.config import ModelConfig
from bmojo_jax.model import LanguageModel
from bmojo_jax.training.config import abstract_model


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be read; the message names its path. Nothing is deleted."""


class Checkpoints:
    """Orbax `CheckpointManager` over `directory`, one step directory per save with the items
    `params`, `opt_state` (pytrees) and `meta` (JSON). Saving is synchronous (our choice: a save
    is complete when `save` returns)."""

    def __init__(self, directory, max_to_keep: int | None = None, *, create: bool = True):
        """max_to_keep: None keeps every checkpoint; create: make `directory` if it is missing."""
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)))

    def restore(self, step: int | None, params=None, opt_state=None):
        """Restores the checkpoint of `step` (None: the latest).

        Args:
          params, opt_state: pytrees of arrays (or ShapeDtypeStructs) giving the structure and the
            shardings; an item left None is not read.

        Returns:
          (meta, params, opt_state), the unread items None.

        Raises:
          FileNotFoundError: no such checkpoint (the message names the directory and its steps).
          CheckpointError: the checkpoint is unreadable or does not match the given structure.
        """
        steps = list(self.manager.all_steps())
        step = self.latest_step() if step is None else step
        if step is None or step not in steps:
            raise FileNotFoundError(f"no checkpoint {'' if step is None else f'of step {step} '}in "
                                    f"{self.directory} (saved steps: {sorted(steps)}).")
        items = {"meta": ocp.args.JsonRestore()}
        for name, tree in (("params", params), ("opt_state", opt_state)):
            if tree is not None:
                items[name] = ocp.args.StandardRestore(
                    jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax and tensorstore raise many types on bad files
            others = sorted(s for s in steps if s != step)
            raise CheckpointError(
                f"cannot restore the checkpoint {self.directory / str(step)}: it is corrupt, "
                f"incomplete, or of a different model ({type(e).__name__}: {e}). Nothing was "
                f"deleted; other checkpoints there: steps {others}. Move the bad directory aside "
                f"to use an earlier one.") from e
        return restored["meta"], restored.get("params"), restored.get("opt_state")

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc_info) -> None:
        self.manager.close()


def load_checkpoint(workdir, step: int | None = None):
    """Reads a checkpoint of a training workdir (never writes).

    Args:
      workdir: a training workdir (its `checkpoints/`).
      step: the checkpoint's step (None: the latest).

    Returns:
      (meta, model_cfg, params): meta {"step", "config": the training config as a dict, "model"},
      the `ModelConfig`, and the `nnx.Param` state on the default device (merge with the graphdef
      of `abstract_model(model_cfg)`, or use `load_model`).

    Raises:
      FileNotFoundError: no checkpoint (the message names the path); CheckpointError: unreadable.
    """
    meta, model_cfg, _, params = _read(workdir, step)
    return meta, model_cfg, params


def load_model(workdir, step: int | None = None
               ) -> tuple[LanguageModel, ml_collections.ConfigDict, int]:
    """The trained model of a checkpoint of a training workdir, ready to call (never writes).

    Args:
      workdir: a training workdir (its `checkpoints/`).
      step: the checkpoint's step (None: the latest).

    Returns:
      (model, config, step): the `LanguageModel` with the saved parameters on the default device,
      the training config it was trained with, and the checkpoint's step.

    Raises:
      FileNotFoundError: no checkpoint (the message names the path); CheckpointError: unreadable.
    """
    meta, _, graphdef, params = _read(workdir, step)
    return nnx.merge(graphdef, params), ml_collections.ConfigDict(meta["config"]), meta["step"]


def _read(workdir, step):
    """(meta, model_cfg, graphdef, params) of a checkpoint; see `load_checkpoint`."""
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory {directory.absolute()}: train first, or "
                                f"check the workdir.")
    with Checkpoints(directory, create=False) as checkpoints:
        meta, _, _ = checkpoints.restore(step)
        model_cfg = ModelConfig(**meta["model"])
        graphdef, params = nnx.split(abstract_model(model_cfg), nnx.Param)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                              params)
        _, params, _ = checkpoints.restore(meta["step"], params)
    return meta, model_cfg, graphdef, params
