"""Checkpoints of a training workdir: the orbax wrapper the training loop saves and restores with
(`Checkpoints`, `CheckpointError`), and the readers for evaluation and notebooks
(`load_checkpoint`, `load_model`, `load`).

A checkpoint is `<workdir>/checkpoints/<step>/` with the orbax items `params` (the `nnx.Param`
state), `opt_state` (the optax state) and `meta` (JSON: step, config, model, and what the training
loop adds). The readers build the model abstractly (`abstract_model`: no random initialisation)
and restore into that structure.

Checked restores (our choice): `save` records in the meta a checksum of every array
("checksums": {"params" | "opt_state": {path: 16 hex digits}}, `tree_checksums`: two 32-bit sums
of the array's bits weighted by odd functions of the position, computed on the devices, so a
sharded array is never gathered), and `restore` recomputes them: a mismatch (a flipped bit, bytes
overwritten) or a non-finite restored parameter raises `CheckpointError` naming the checkpoint and
the earlier ones to use instead (`--step`). Nothing is ever deleted on an error.

Saves never lose the last good checkpoint: `save` refuses non-finite parameters, checks the free
disk space first (about the arrays' bytes), and a failed write (disk full) raises one
`CheckpointError` (orbax's own error output of that save, a flood of asyncio tracebacks, is
held back) and removes only its own incomplete temporary directory. Rotation (`max_to_keep`)
keeps the newest checkpoints and, besides them, the newest one whose meta says "valid_finite"
(its validation results were finite).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from bmojo_jax import data as data_lib
from bmojo_jax.config import ModelConfig
from bmojo_jax.model import LanguageModel
from bmojo_jax.training.config import abstract_model


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, is damaged, or cannot be written; the message names its path.
    Nothing is deleted."""


class DataMismatchWarning(UserWarning):
    """The data differs from the data a checkpoint was trained on (both fingerprints named)."""


class Checkpoints:
    """Orbax `CheckpointManager` over `directory`, one step directory per save with the items
    `params`, `opt_state` (pytrees) and `meta` (JSON). Saving is synchronous (our choice: a save
    is complete when `save` returns). See the module docstring for the checks."""

    def __init__(self, directory, max_to_keep: int | None = None, *, create: bool = True):
        """max_to_keep: None keeps every checkpoint; create: make `directory` if it is missing."""
        self.directory = Path(directory).absolute()
        self.max_to_keep = max_to_keep
        # Rotation is ours (`_rotate`): orbax's would delete the last good checkpoint. The
        # writer (create=True, the training loop, alone in its workdir: `workdir.WorkdirLock`)
        # removes the temporary directories of saves a kill interrupted; readers never do.
        options = ocp.CheckpointManagerOptions(max_to_keep=None, create=create,
                                               cleanup_tmp_directories=create,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._good = {}  # step -> its meta's "valid_finite"

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, meta: dict) -> None:
        """Saves a checkpoint of `step`, its arrays' checksums added to `meta`, then rotates.

        Raises:
          CheckpointError: non-finite parameters (nothing written), too little free disk space
            (nothing written), or the write failed (its temporary directory removed); the earlier
            checkpoints are untouched.
        """
        trees = {"params": params, "opt_state": opt_state}
        checksums, finite = tree_checksums(trees)
        bad = [k for k, ok in finite["params"].items() if not ok]
        if bad:
            raise CheckpointError(f"not saving the checkpoint of step {step} in {self.directory}: "
                                  f"{len(bad)} parameter arrays hold NaN or inf (first: "
                                  f"{bad[0]}); the last checkpoint is {self._last()}.")
        self._check_space(step, trees)
        meta = {**meta, "checksums": checksums}
        args = ocp.args.Composite(params=ocp.args.StandardSave(params),
                                  opt_state=ocp.args.StandardSave(opt_state),
                                  meta=ocp.args.JsonSave(meta))
        with _held_stderr() as held:
            try:
                self.manager.save(step, args=args)
            except Exception as e:  # orbax and tensorstore raise many types (ValueError, OSError)
                held.drop()
                # Its failed asyncio tasks log "Task exception was never retrieved" whenever they
                # are collected, maybe after stderr is released: drop those records from now on.
                logging.getLogger("asyncio").addFilter(_drop_orbax_task_errors)
                time.sleep(0.5)  # orbax's threads report their failures a little later
                gc.collect()
                for temp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                    shutil.rmtree(temp, ignore_errors=True)
                full = "No space left" in str(e) or getattr(e, "errno", None) == 28
                raise CheckpointError(
                    f"cannot write the checkpoint of step {step} in {self.directory}: "
                    f"{'the disk is full' if full else 'the write failed'} "
                    f"({type(e).__name__}: {_first_line(e)}). Its incomplete files were removed; "
                    f"the last checkpoint is {self._last()}. Free some space (or fix the cause) "
                    f"and rerun the same command to resume.") from None
        self._good[step] = bool(meta.get("valid_finite", True))
        self._rotate()

    def _last(self) -> str:
        step = self.latest_step()
        return "none (no checkpoint was written)" if step is None else f"step {step}"

    def _check_space(self, step: int, trees) -> None:
        """CheckpointError when the disk holding the checkpoints has less free space than the
        arrays' bytes (this process's share) plus 10% and 1 MiB."""
        nbytes = sum(int(x.nbytes) for x in jax.tree.leaves(trees)) // jax.process_count()
        needed = int(nbytes * 1.1) + (1 << 20)
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise CheckpointError(
                f"not enough disk space for the checkpoint of step {step} in {self.directory}: it "
                f"needs about {needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free. Nothing "
                f"was written; the last checkpoint is {self._last()}. Free some space and rerun "
                f"the same command to resume.")

    def _rotate(self) -> None:
        """Deletes all but the newest `max_to_keep` checkpoints and the newest good one."""
        steps = self.all_steps()
        if not self.max_to_keep or len(steps) <= self.max_to_keep:
            return
        keep = set(steps[-self.max_to_keep:])
        good = self.last_good_step()
        if good is not None:
            keep.add(good)
        for s in steps:
            if s not in keep:
                self.manager.delete(s)
                self._good.pop(s, None)

    def last_good_step(self) -> int | None:
        """The newest step whose meta says its validation was finite ("valid_finite", true when
        absent), or None."""
        return next((s for s in reversed(self.all_steps()) if self._is_good(s)), None)

    def _is_good(self, step: int) -> bool:
        if step not in self._good:
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore()))["meta"]
                self._good[step] = bool(meta.get("valid_finite", True))
            except Exception:  # an unreadable checkpoint is not a good one; it is not deleted
                return False
        return self._good[step]

    def restore(self, step: int | None, params=None, opt_state=None):
        """Restores the checkpoint of `step` (None: the latest) and verifies it.

        Args:
          params, opt_state: pytrees of arrays (or ShapeDtypeStructs) giving the structure and the
            shardings; an item left None is not read.

        Returns:
          (meta, params, opt_state), the unread items None.

        Raises:
          FileNotFoundError: no such checkpoint (the message names the directory and its steps).
          CheckpointError: the checkpoint is unreadable, does not match the given structure, its
            arrays do not match their saved checksums, or a restored array holds NaN or inf.
        """
        steps = self.all_steps()
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
            raise CheckpointError(
                f"cannot restore the checkpoint {self.directory / str(step)}: it is corrupt, "
                f"incomplete, or of a different model ({type(e).__name__}: {_first_line(e)}). "
                f"Nothing was deleted. {self._alternatives(step, steps)}") from e
        self._verify(step, steps, restored)
        return restored["meta"], restored.get("params"), restored.get("opt_state")

    def _verify(self, step: int, steps: list[int], restored) -> None:
        """CheckpointError when a restored array's checksum differs from the saved one, or a
        restored array holds NaN or inf."""
        trees = {name: restored[name] for name in ("params", "opt_state")
                 if restored.get(name) is not None}
        if not trees:
            return
        checksums, finite = tree_checksums(trees)
        saved = restored["meta"].get("checksums") or {}
        for name, sums in checksums.items():
            if name not in saved:  # saved before checksums existed
                continue
            changed = [k for k, v in sums.items() if saved[name].get(k) != v]
            if changed:
                raise CheckpointError(
                    f"the checkpoint {self.directory / str(step)} is damaged: {len(changed)} of "
                    f"the {len(sums)} {name} arrays differ from their checksums saved with it "
                    f"(first: {changed[0]}). Nothing was deleted. "
                    f"{self._alternatives(step, steps)}")
        for name, flags in finite.items():
            bad = [k for k, ok in flags.items() if not ok]
            if bad:
                raise CheckpointError(
                    f"the checkpoint {self.directory / str(step)} holds NaN or inf in {len(bad)} "
                    f"{name} arrays (first: {bad[0]}). Nothing was deleted. "
                    f"{self._alternatives(step, steps)}")

    def _alternatives(self, step: int, steps: list[int]) -> str:
        earlier = [s for s in steps if s < step]
        if not earlier:
            others = [s for s in steps if s != step]
            return (f"There is no earlier checkpoint (other steps: {others})." if others else
                    "There is no other checkpoint.")
        return (f"Earlier checkpoints: steps {earlier}; evaluate or generate from the previous one "
                f"with --step={earlier[-1]} (step={earlier[-1]}), or move "
                f"{self.directory / str(step)} aside to resume training from it.")

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc_info) -> None:
        with _held_stderr() as held:
            if exc_info[0] is not None:
                held.drop()  # a failed save's threads may still be reporting
            self.manager.close()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class _Held:
    def __init__(self, file):
        self.file, self.dropped = file, False

    def drop(self) -> None:
        self.dropped = True


def _drop_orbax_task_errors(record: logging.LogRecord) -> bool:
    """A filter for the "asyncio" logger: False (drop) for the failures of orbax's write tasks and
    futures that nobody awaited ("Task exception was never retrieved", "_GatheringFuture
    exception was never retrieved"), left behind by a failed save already reported as
    `CheckpointError`."""
    message = record.getMessage()
    return not ("exception was never retrieved" in message.split("\n", 1)[0]
                and "orbax" in message)


@contextlib.contextmanager
def _held_stderr():
    """Holds back what anything in this process (Python, C++ threads) writes to stderr (file
    descriptor 2) inside the block, then writes it out, unless `drop()` was called: a failed orbax
    save makes its threads print dozens of asyncio tracebacks after its one real error."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable stderr: nothing to hold back
        yield _Held(None)
        return
    with tempfile.TemporaryFile() as file:
        os.dup2(file.fileno(), 2)
        held = _Held(file)
        try:
            yield held
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not held.dropped:
                file.seek(0)
                text = file.read()
                if text:
                    os.write(2, text)


def _words(x):
    """The bits of x as uint32 (itemsizes 1 and 2 widened, 8 split into two words)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_checksum(x):
    """Two uint32 checksums [2] of one array. Each sum weights word i (row-major) by an odd
    number, so changing any one word (one flipped bit) always changes both; the second mixes each
    word first (x ^ x >> 16, a bijection). Integer sums wrap, in any order: the result does not
    depend on the sharding."""
    words = _words(x)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):  # no reshape: a sharded array stays in place
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(
            stride % 2**32)
        stride *= words.shape[axis]
    first = jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)
    second = jnp.sum((words ^ (words >> 16)) * ((index * jnp.uint32(0x9E3779B9)) | 1),
                     dtype=jnp.uint32)
    return jnp.stack([first, second])


def _leaf_finite(x):
    return jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)


_checksums = jax.jit(lambda tree: (jax.tree.map(_leaf_checksum, tree),
                                   jax.tree.map(_leaf_finite, tree)))


def tree_checksums(trees: dict) -> tuple[dict, dict]:
    """Checksums of every array of `trees` ({name: pytree}), computed on the arrays' devices.

    Returns:
      ({name: {path: "16 hex digits"}}, {name: {path: finite (bool)}}), paths as
      `jax.tree_util.keystr`.
    """
    fetched_sums, fetched_finite = _checksums(trees)
    sums, finite = {}, {}
    for name in trees:
        sums[name] = {jax.tree_util.keystr(path): "%08x%08x" % tuple(int(w) for w in _local(words))
                      for path, words in jax.tree_util.tree_leaves_with_path(fetched_sums[name])}
        finite[name] = {jax.tree_util.keystr(path): bool(_local(ok))
                        for path, ok in jax.tree_util.tree_leaves_with_path(fetched_finite[name])}
    return sums, finite


def _local(x) -> np.ndarray:
    """A replicated (global) array's value on this host."""
    return np.asarray(x.addressable_data(0) if hasattr(x, "addressable_data") else x)


# --------------------------------------------------------------------------------------------------
# The data a checkpoint was trained on
# --------------------------------------------------------------------------------------------------


def data_differences(saved: dict | None, current: dict) -> dict:
    """{split: (saved fingerprint, current fingerprint)} of the splits whose fingerprints differ
    (`data.text_fingerprint`); {} when they agree or the checkpoint recorded none."""
    saved = saved or {}
    return {split: (saved[split], current[split]) for split in current
            if split in saved and saved[split] != current[split]}


def describe_differences(differences: dict) -> str:
    return "; ".join(f"{split}: sha256 {old} when trained, {new} now"
                     for split, (old, new) in differences.items())


# --------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------


def load_checkpoint(workdir, step: int | None = None, model_overrides: dict | None = None):
    """Reads a checkpoint of a training workdir (never writes), verified (`Checkpoints.restore`).

    Args:
      workdir: a training workdir (its `checkpoints/`).
      step: the checkpoint's step (None: the latest).
      model_overrides: {ModelConfig field: value} applied to the saved model config, for knobs
        that leave the parameters as they are (e.g. eidetic_slots, eidetic_per_chunk = 0 to turn
        the eidetic memory off, eidetic_selection, window): the trained weights run with another
        memory at inference (our choice, for ablations). Saved parameters the changed model does
        not read (say, the innovation predictor of a memory turned off) are left out.

    Returns:
      (meta, model_cfg, params): meta {"step", "config": the training config as a dict, "model",
      ...} as saved, the `ModelConfig` (with the overrides), and the `nnx.Param` state on the
      default device (merge with the graphdef of `abstract_model(model_cfg)`, or use
      `load_model`).

    Raises:
      FileNotFoundError: no checkpoint (the message names the path); CheckpointError: unreadable
      or damaged.
      ValueError: an override names no ModelConfig field, has an invalid value, or changes a
        parameter's shape or adds one (the message names the parameter).
    """
    meta, model_cfg, _, params = _read(workdir, step, model_overrides)
    return meta, model_cfg, params


def load_model(workdir, step: int | None = None, model_overrides: dict | None = None
               ) -> tuple[LanguageModel, ml_collections.ConfigDict, int]:
    """The trained model of a checkpoint of a training workdir, ready to call (never writes).

    Args:
      workdir: a training workdir (its `checkpoints/`).
      step: the checkpoint's step (None: the latest).
      model_overrides: as in `load_checkpoint`.

    Returns:
      (model, config, step): the `LanguageModel` with the saved parameters on the default device,
      the training config it was trained with, and the checkpoint's step.

    Raises:
      FileNotFoundError: no checkpoint (the message names the path); CheckpointError: unreadable
      or damaged.
    """
    meta, _, graphdef, params = _read(workdir, step, model_overrides)
    return nnx.merge(graphdef, params), ml_collections.ConfigDict(meta["config"]), meta["step"]


def with_overrides(model: LanguageModel, model_overrides: dict) -> LanguageModel:
    """The same trained model with `model_overrides` ({ModelConfig field: value}) applied, as
    `load_checkpoint` applies them (e.g. dict(eidetic_slots=0, eidetic_per_chunk=0): the
    eidetic memory turned off at inference); `model` itself is unchanged and shares its
    parameter arrays with the result.

    Raises:
      ValueError: as `load_checkpoint`'s model_overrides.
    """
    _, graphdef, params = _overridden(model.config, nnx.state(model, nnx.Param), model_overrides)
    return nnx.merge(graphdef, params)


def _read(workdir, step, model_overrides=None):
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
    if model_overrides:
        model_cfg, graphdef, params = _overridden(model_cfg, params, model_overrides)
    return meta, model_cfg, graphdef, params


def _overridden(model_cfg: ModelConfig, params, overrides: dict):
    """(model_cfg, graphdef, params) of the model with `overrides` applied, reading the saved
    `params` it has; see `load_checkpoint`."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"model_overrides: {unknown} are not ModelConfig fields; valid fields: "
                         f"{sorted(fields)}.")
    try:
        changed = dataclasses.replace(model_cfg, **overrides)
    except ValueError as e:
        raise ValueError(f"model_overrides {overrides}: {e}") from None
    graphdef, wanted = nnx.split(abstract_model(changed), nnx.Param)
    saved = dict(nnx.to_flat_state(params))
    for path, variable in nnx.to_flat_state(wanted):
        have, shape = saved.get(path), variable.get_value().shape
        if have is None or have.get_value().shape != shape:
            found = "absent" if have is None else f"of shape {have.get_value().shape}"
            raise ValueError(
                f"model_overrides {overrides} change the parameters: "
                f"{'/'.join(map(str, path))} of shape {shape} is {found} in the checkpoint."
                f" Only knobs that keep the trained parameters (e.g. eidetic_slots, "
                f"eidetic_per_chunk, eidetic_selection, window) can change at evaluation.")
    return changed, graphdef, nnx.from_flat_state(
        {path: saved[path] for path, _ in nnx.to_flat_state(wanted)})


class SyntheticTask:
    """What `load` returns instead of a tokenizer for a run on a synthetic task: the task's
    description, and the tokenizer interface over the task's own ids (a text is the ids written
    as decimal integers separated by spaces).

    Attributes:
      name: the task (`data.SYNTHETIC_TASKS`); arguments: its generator's keyword arguments
        (`config.data.task`); seq_len: the training length; vocab_size: ids lie in
        [0, vocab_size).
      unk_token, unknown_id: None (every id in range is a token of the task).
    """

    unk_token = None
    unknown_id = None

    def __init__(self, name: str, arguments: dict, seq_len: int):
        self.name, self.arguments, self.seq_len = name, dict(arguments), seq_len
        self.vocab_size = int(self.arguments["vocab_size"])

    def encode(self, text: str) -> np.ndarray:
        """int32 [t] ids of "3 17 5".

        Raises:
          ValueError: a word that is not an integer in [0, vocab_size)."""
        try:
            ids = np.array([int(word) for word in text.split()], np.int32)
        except ValueError:
            raise ValueError(f"{text!r}: a synthetic task's text is its token ids, integers "
                             f"separated by spaces (in [0, {self.vocab_size})).") from None
        data_lib.check_token_ids(ids, self.vocab_size)
        return ids

    def decode(self, ids) -> str:
        """"3 17 5" of int ids [...]."""
        data_lib.check_token_ids(ids, self.vocab_size)
        return " ".join(str(int(i)) for i in np.asarray(ids).ravel())

    def __repr__(self) -> str:
        return f"SyntheticTask({self.name!r}, {self.arguments}, seq_len={self.seq_len})"


class LoadedRun(NamedTuple):
    """What `load` returns (a named tuple: `model, tokenizer, config, step = load(workdir)`)."""
    model: LanguageModel
    tokenizer: object  # data.WordTokenizer | data.BPETokenizer | SyntheticTask
    config: ml_collections.ConfigDict
    step: int


def load(workdir, step: int | None = None, model_overrides: dict | None = None) -> LoadedRun:
    """A trained run, ready for generation in a notebook: the model of a checkpoint, the run's own
    tokenizer and its config (reads the workdir, never writes).

        model, tokenizer, config, step = bmojo_jax.load("workdir/ptb_bmojo")
        prompt = tokenizer.encode("the company said")[None]
        new = bmojo_jax.generate(model, prompt, 20)
        print(tokenizer.decode(new[0]))

    Args:
      workdir: a training workdir.
      step: the checkpoint's step (None: the latest; an earlier one when the latest is damaged).
      model_overrides: as in `load_checkpoint` (e.g. a memory turned off at inference).

    Returns:
      `LoadedRun(model, tokenizer, config, step)`:
        model: the `LanguageModel` with the checkpoint's parameters, on the default device;
        tokenizer: text corpora: the tokenizer saved in the workdir with the first checkpoint
          (`data.WordTokenizer` for PTB, `data.BPETokenizer` otherwise); synthetic tasks: a
          `SyntheticTask` (the task's description; its texts are ids written as integers). Each
          has `encode(str) -> np.ndarray` int32 [t], `decode(ids) -> str`, `vocab_size`, and
          `unk_token` / `unknown_id`: the word and id that stand for any word outside the
          vocabulary (PTB: "<unk>" and its id; `encode` maps unknown words to it), None where
          every text has ids (byte-level BPE, synthetic tasks);
        config: the training config (`ml_collections.ConfigDict`);
        step: the checkpoint's step.
      A workdir trained before tokenizers were saved gets its tokenizer rebuilt from the data,
      with a `DataMismatchWarning` when the data differs from the checkpoint's.

    Raises:
      FileNotFoundError: no checkpoint (the message names the path).
      CheckpointError: the checkpoint is unreadable or damaged (the message offers earlier steps).
      ValueError: the saved tokenizer is damaged (the message names it); a bad override (as
        `load_checkpoint`).
    """
    meta, _, graphdef, params = _read(workdir, step, model_overrides)
    config = ml_collections.ConfigDict(meta["config"])
    model = nnx.merge(graphdef, params)
    if config.data.name in data_lib.SYNTHETIC_TASKS:
        tokenizer = SyntheticTask(config.data.name, config.data.task.to_dict(),
                                  config.data.seq_len)
    else:
        tokenizer = data_lib.load_tokenizer(workdir)
        if tokenizer is None:  # a workdir of an older version: rebuild it from the data
            data = data_lib.load_data(config)
            differences = data_differences(meta.get("data_fingerprint"), data.fingerprints)
            warnings.warn(f"{workdir} holds no saved tokenizer; rebuilt it from the data" + (
                f", which differs from the checkpoint's ({describe_differences(differences)}): "
                f"its token ids may not be the model's" if differences else ""),
                DataMismatchWarning, stacklevel=2)
            tokenizer = data.corpus.tokenizer
    return LoadedRun(model, tokenizer, config, meta["step"])
