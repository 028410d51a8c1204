"""The training job (`train_and_evaluate`) and the evaluation of a saved checkpoint
(`evaluate_checkpoint`).

`train_and_evaluate(config, workdir)` is the whole job: build the data and the model from an
`ml_collections.ConfigDict` (schema: `default_config`), train with AdamW, evaluate on the
validation split as it goes, save orbax checkpoints, and finally evaluate on the full validation
and test splits.

A run ends at `num_steps`, or earlier when `config.early_stop` says so after a periodic
validation evaluation (`early_stop_reason`: a target reached, or no improvement for `patience`
evaluations). An early stop saves a checkpoint at its step and writes a "stop" record; then come
the final evaluations, as at `num_steps`. Starting again on a finished workdir trains and evaluates
nothing: it says "already finished at step N" and why, and returns the results saved in
`results.json`; `reevaluate=True` repeats the final evaluations (their records are appended again),
as does a start on a finished workdir without `results.json` (killed during its final evaluations).

Exact resume: the batch of step s is a pure function of (s, config.seed) (`lm_batch`, or a
per-epoch permutation for synthetic tasks; `data.load_data`) and of the copy-only phase's end
(`copy_phase_end`, from the validation results), and a checkpoint holds the parameters, the
optimizer state, the step and the periodic validation results so far, so a run killed at any
point and restarted with the same workdir reaches the same parameters and the same early-stop
decision as an uninterrupted one (the decision is recomputed from the checkpoint's
validation results; metrics.jsonl is never read back). The checkpoint also holds the step metrics
since the last training record, so the records after a resume are those of an uninterrupted run
(each "train" record covers the steps since the previous one, whatever the checkpoint steps), but
for the fields of `metrics.TIMING_FIELDS`. Changing `num_steps` on resume changes the
learning-rate schedule from there on; changing `early_stop` re-decides over the saved results.

Timing: the first step of every start traces and compiles the train step; its wall time is the
"compile_s" of the first training record of that start, and it is left out of "tokens_per_s" and
of the progress bar's rate and ETA (the bar appears after it).

Reliability (docs/design.md section 3): one run per workdir (`workdir.WorkdirLock`; a second
start raises `WorkdirLocked` naming the first); every step's loss, gradient norm and updated
parameters are checked for NaN/inf on the device and looked at where the loop fetches its metrics
anyway, and nothing non-finite is ever saved; `config.on_divergence` says what a diverged step does
("stop": `TrainingDiverged`; "skip": its update is not applied; "rollback": back to the last good
checkpoint with a lower learning rate); checkpoint rotation keeps the last checkpoint whose
validation was finite; restores are verified (`checkpoints`). A text run saves its tokenizer with
its first checkpoint and uses it from then on; every checkpoint records the sha256 fingerprints of
the data, and a resume on other training data is refused (an evaluation warns).

Workdir layout:
    checkpoints/<step>/  orbax items `params`, `opt_state`, `meta` (JSON: step, config, model,
                         valid_history: the periodic validation results [{"step", "loss",
                         "perplexity", and where measured the other `EARLY_STOP_METRICS`}]
                         through that step, train_window: the step metrics [{"loss", ...}]
                         since the last "train" record)
    metrics.jsonl        one JSON object a line: {"step", "split", ...}; split "train", "valid"
                         (periodic), "stop" (an early stop: "reason" "target" or "patience",
                         "message"), "curriculum" (the copy-only phase ended early:
                         "copy_phase_end", "message"; `copy_phase_end`), "valid_final" (with
                         "steps_to_0.9" on synthetic tasks), "test_final". On resume the lines
                         after the restored step are dropped (atomically), so the file matches
                         an uninterrupted run's. Fields of a
                         "train" record: the means of the step metrics since the previous one
                         (loss, ce, aux_loss, grad_norm), lr (of its last step), tokens_per_s
                         (None when its only step is the compiling one), compile_s (the first
                         record of a start only)
    events.out.tfevents.*  the same records for TensorBoard ("<split>/<field>"; `MetricsLog`)
    results.json         what `train_and_evaluate` returned when the run finished
    metrics.png          cross-entropy and perplexity (and accuracy) against the step, drawn at the
                         end (`metrics.plot_metrics`)
    config.json          the config of the latest start, for people, and its "provenance"
                         (command, git commit, jax version, devices: `bmojo_jax.provenance`)
    tokenizer.json       a text run's own tokenizer (BPE, the `tokenizers` library's JSON), or
    vocab.txt            (PTB) its word vocabulary, saved with the first checkpoint
    lock                 held by the running process (`workdir.WorkdirLock`)
    (checkpoint meta)    also: data_fingerprint {split: sha256}, checksums of the arrays,
                         divergences (the recovered diverged steps), lr_scale, valid_finite
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from bmojo_jax import data as data_lib
from bmojo_jax import provenance
from bmojo_jax import sharding as sharding_lib
from bmojo_jax.config import ModelConfig, check_choice
from bmojo_jax.generation import generate
from bmojo_jax.model import LanguageModel, count_params
from bmojo_jax.training.checkpoints import (Checkpoints, DataMismatchWarning, data_differences,
                                            describe_differences, load_checkpoint)
from bmojo_jax.training.config import (EARLY_STOP_METRICS, document_separator, model_config,
                                       oracle_length, unfilled_eidetic_buffer, validate_config)
from bmojo_jax.training.metrics import MetricsLog, plot_metrics, write_json_atomic
from bmojo_jax.training.steps import (compiler_options, evaluate_split, learning_rate_schedule,
                                      make_eval_step, make_optimizer, make_train_step)
from bmojo_jax.training.workdir import WorkdirLock, prepare_workdir


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, *,
                       reevaluate: bool = False) -> dict:
    """Trains and evaluates as `config` says, in `workdir`, resuming from its latest checkpoint.

    Prints the validation results every `eval_every` steps and the final ones; shows progress bars
    (training: loss, tokens/s, ETA, after the compiling first step; evaluations: batches). Stops
    at `num_steps` or as `config.early_stop` says (module docstring); on a finished workdir it
    trains no further, says "already finished at step N" and why, and returns the saved results
    (`reevaluate=True`: repeats the final evaluations).

    Returns:
      {"step": the last training step, "params": parameter count, "stop_reason": "num_steps",
       "target" or "patience" (`early_stop_reason`), "valid": full-split `evaluate` result,
       "test": same, "steps_to_0.9" (synthetic tasks only): the first evaluated step whose
       validation accuracy is >= 0.9, periodic evaluations and the final one (None if none),
       "copy_phase_end" (runs with a copy-only phase only): `copy_phase_end`,
       "sample": generated text (text corpora only)}.

    Raises:
      ValueError: a bad config value, or the workdir's checkpoint is of a different model.
      CheckpointError: the latest checkpoint is unreadable or damaged, or a checkpoint cannot be
        written (disk full); nothing is deleted.
      TrainingDiverged: a step diverged (config.on_divergence "stop", or more than
        config.max_divergences); nothing non-finite was saved.
      WorkdirError: the workdir cannot be created or written; WorkdirLocked: another process
        runs in it.
      data.MissingDataError: the corpus is not installed.
      ValueError: also: the training data differs from the checkpoint's (both fingerprints).
    """
    validate_config(config)
    if config.distributed:
        sharding_lib.initialize_distributed()  # before anything touches the devices
    workdir = prepare_workdir(workdir)
    with WorkdirLock(workdir, enabled=jax.process_index() == 0):
        try:
            return _train_and_evaluate(config, workdir, reevaluate)
        except BaseException:  # the error's message starts on a line of its own
            for bar in list(getattr(tqdm, "_instances", ())):
                bar.close()
            raise


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: Path,
                        reevaluate: bool) -> dict:
    """`train_and_evaluate` in a prepared, locked workdir."""
    mesh = sharding_lib.make_mesh(config.mesh_shape)
    host_rows = sharding_lib.process_rows(mesh, config.batch_size)  # checks the batch divides
    data = data_lib.load_data(config, tokenizer=_saved_tokenizer(workdir))  # the run's own
    model_cfg = model_config(config, data.vocab_size)
    if model_cfg.vocab_size < data.vocab_size:
        raise ValueError(f"config.model.vocab_size={model_cfg.vocab_size} is smaller than the "
                         f"data's vocabulary ({data.vocab_size}).")
    buffer_warning = unfilled_eidetic_buffer(model_cfg, config.data.seq_len)
    if buffer_warning is not None:
        warnings.warn(buffer_warning, stacklevel=2)
    model = LanguageModel(model_cfg, rngs=nnx.Rngs(config.seed))
    n_params = count_params(model)
    graphdef, params = nnx.split(model, nnx.Param)
    meta = {"config": config.to_dict(), "model": dataclasses.asdict(model_cfg),
            "data_fingerprint": data.fingerprints}
    separator = document_separator(config, data)
    eval_split = functools.partial(evaluate_split, make_eval_step(
        model_cfg, mesh, oracle_length=oracle_length(config), separator=separator), data=data,
                                   batch_size=config.eval_batch_size or config.batch_size,
                                   seq_len=config.data.eval_seq_len or config.data.seq_len)

    with Checkpoints(workdir / "checkpoints", config.max_to_keep) as checkpoints:
        # The fresh state is placed on the mesh first: a checkpoint is restored onto these
        # shardings, so a run saved on one mesh shape resumes on any other.
        params, opt_state = sharding_lib.shard_tree(
            (params, make_optimizer(config).init(params)), mesh)
        step, params, opt_state, history, pending = _resume(checkpoints, params, opt_state, meta)
        if jax.process_index() == 0:
            write_json_atomic(workdir / "config.json",
                              {**meta, "provenance": provenance.provenance()})
        guard = _Divergence(config, _check_data(checkpoints, checkpoints.latest_step(), data))
        stop = _stop(config, step, history)
        tqdm.write(f"{config.model_preset} ({model_cfg.layer_mixers}): {n_params:,} parameters; "
                   f"{config.data.name}, vocab {data.vocab_size}; " +
                   (f"starting at step {step}" if stop is None else
                    f"already finished at step {step} ({stop['message']}): not training further"))
        saved = _saved_results(workdir / "results.json", step, stop)
        if saved is not None and not reevaluate:
            tqdm.write(f"its final results: {workdir / 'results.json'} (to evaluate again: "
                       f"reevaluate=True, experiments.train --reevaluate)")
            return saved
        if stop is not None:
            tqdm.write("evaluating again (reevaluate=True)" if saved is not None else
                       "no saved final results (results.json): evaluating")
        metrics = MetricsLog(workdir / "metrics.jsonl", keep_through_step=step)
        train_step = _guarded_train_step(model_cfg, config, mesh, guard, separator)
        bar = None  # made after the first step: its rate and ETA leave the compilation out
        tic, timed, compile_s = time.perf_counter(), 0, None

        def log_train():
            nonlocal tic, pending, timed, compile_s
            pending = jax.device_get(pending)  # waits for the steps, so the timing is true
            record = _train_record(guard.train_config, step, pending, timed,
                                   time.perf_counter() - tic, compile_s)
            metrics.write(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}",
                            tok_s=f"{record['tokens_per_s'] or 0:,.0f}")
            tic, pending, timed, compile_s = time.perf_counter(), [], 0, None

        copy_end = copy_phase_end(config.data, history)
        while stop is None:
            # The global batch of a step is a pure function of (step, seed, the copy phase's end)
            # on every host; each host transfers only the rows of its own devices
            # (`sharding.global_batch`).
            batch = [np.asarray(x)[host_rows] for x in (
                data.train_batch(step, copy_only=step < copy_end) if copy_end
                else data.train_batch(step))]
            params, opt_state, step_metrics = train_step(
                params, opt_state, *sharding_lib.global_batch(batch, mesh, config.batch_size),
                guard.poison(step))
            pending.append(step_metrics)
            step += 1
            if bar is None:  # this start's first step: it traced and compiled the train step
                jax.block_until_ready(step_metrics)
                compile_s = time.perf_counter() - tic
                tqdm.write(f"step {step}: compiled and ran the train step in {compile_s:.1f} s")
                bar = tqdm(total=config.num_steps, initial=step, unit="step", dynamic_ncols=True)
                tic = time.perf_counter()
            else:
                timed += 1
                bar.update(1)
            if _at_boundary(config, step) and guard.check(pending, step, checkpoints, metrics):
                # config.on_divergence="rollback": the last good checkpoint, a lower learning rate
                step, params, opt_state, history, pending = _roll_back(
                    checkpoints, guard.rollback_step, params, opt_state, model_cfg, config, mesh)
                copy_end = copy_phase_end(config.data, history)
                train_step = _guarded_train_step(model_cfg, config, mesh, guard, separator)
                metrics.close()
                metrics = MetricsLog(workdir / "metrics.jsonl", keep_through_step=step)
                guard.record_rollback(metrics, step)
                bar.n = step
                bar.refresh()
                tic, timed = time.perf_counter(), 0
                continue
            if (step % config.log_every == 0 or step == config.num_steps) and pending:
                log_train()  # (all the steps since the last record may have been skipped)
            if step % config.eval_every == 0 and step < config.num_steps:
                jax.block_until_ready(pending)  # the pending steps' time stays theirs
                eval_tic = time.perf_counter()
                result = eval_split(params, split="valid", max_batches=config.eval_batches)
                _log_eval(metrics, "valid", step, result)
                history.append({"step": step, **{k: result[k] for k in EARLY_STOP_METRICS
                                                 if k in result}})
                if copy_phase_end(config.data, history) != copy_end:
                    copy_end = step
                    metrics.write({"step": step, "split": "curriculum", "copy_phase_end": step,
                                   "message": f"validation copy_accuracy "
                                              f"{result['copy_accuracy']:.4g} >= copy_only_until "
                                              f"{config.data.copy_only_until:g}: the copy-only "
                                              f"phase ends, the mix starts"})
                    tqdm.write(f"step {step}: the copy-only phase ends (copy_accuracy "
                               f"{result['copy_accuracy']:.4g})")
                tic += time.perf_counter() - eval_tic  # the evaluation is not training time
            stop = _stop(config, step, history)
            if stop is not None and stop["reason"] != "num_steps":
                if pending:
                    log_train()
                metrics.write({"step": step, "split": "stop", **stop})
                tqdm.write(f"step {step}: early stop, {stop['message']}")
            if step % config.checkpoint_every == 0 or stop is not None:
                # never a diverged state over a good checkpoint (max_to_keep would rotate it away)
                pending = jax.device_get(pending)  # checked (guard.check): all finite
                _save_tokenizer(workdir, data, checkpoints)
                checkpoints.save(step, params, opt_state,
                                 {"step": step, **meta, **guard.meta(history),
                                  "valid_history": history,
                                  "train_window": [{k: float(v) for k, v in m.items()}
                                                   for m in pending]})
        if bar is not None:
            bar.close()

    results = {"step": step, "params": n_params, "stop_reason": stop["reason"]}
    if config.data.get("copy_only_steps", 0):
        results["copy_phase_end"] = copy_phase_end(config.data, history)
    for split in ("valid", "test"):
        results[split] = eval_split(params, split=split)
        record = results[split]
        if split == "valid" and data.with_accuracy:
            final = {"step": step, "accuracy": results[split]["accuracy"]}
            results["steps_to_0.9"] = steps_to_accuracy(history + [final], 0.9)
            record = {**record, "steps_to_0.9": results["steps_to_0.9"]}
        _log_eval(metrics, f"{split}_final", step, record)
    if isinstance(data, data_lib.TextData) and config.sample.max_new_tokens:
        prompt = data.corpus.encode(config.sample.prompt)[None]
        params = jax.device_put(params, sharding_lib.replicated(mesh))  # readable on every host
        tokens = generate(nnx.merge(graphdef, params), prompt, config.sample.max_new_tokens,
                          temperature=config.sample.temperature,
                          top_k=config.sample.top_k or None, seed=config.seed)
        results["sample"] = data.corpus.decode(np.concatenate([prompt[0], tokens[0]]))
        tqdm.write(f"sample: {results['sample']}")
    metrics.close()
    if jax.process_index() == 0:
        write_json_atomic(workdir / "results.json", results)
        plot_metrics(workdir / "metrics.jsonl", workdir / "metrics.png", title=workdir.name)
    return results


def early_stop_reason(early_stop: ml_collections.ConfigDict, history: list[dict]) -> dict | None:
    """Why `early_stop` (the `config.early_stop` fields, see `default_config`) stops a run after
    the periodic validation evaluations `history`, or None if it does not.

    The evaluations are replayed in order and the first one that meets a rule decides, so the
    answer for a prefix of a history is the answer the run gave when it reached that prefix.

    Args:
      early_stop: metric, target, patience, min_delta.
      history: [{"step", metric: value, ...}] in step order, as the training loop keeps them.

    Returns:
      None (no rule met, or metric None), or {"reason": "target" | "patience", "message": the rule
      in words, with the step of the evaluation that met it}.

    Raises:
      KeyError: a history entry lacks the metric.
    """
    metric = early_stop.metric
    if metric is None:
        return None
    higher_is_better = EARLY_STOP_METRICS[metric]
    best, best_step, since_best = None, None, 0
    for entry in history:
        value = entry[metric]
        if early_stop.target is not None and (value >= early_stop.target if higher_is_better
                                              else value <= early_stop.target):
            relation = ">=" if higher_is_better else "<="
            return {"reason": "target",
                    "message": f"validation {metric} {value:.6g} {relation} target "
                               f"{early_stop.target:g} at step {entry['step']}"}
        margin = early_stop.min_delta * abs(best) if best is not None else 0.0
        if best is None or (value > best + margin if higher_is_better else value < best - margin):
            best, best_step, since_best = value, entry["step"], 0
        else:
            since_best += 1
        if early_stop.patience is not None and since_best >= early_stop.patience:
            return {"reason": "patience",
                    "message": f"validation {metric} has not improved on {best:.6g} (step "
                               f"{best_step}) by min_delta={early_stop.min_delta:g} relative for "
                               f"{since_best} evaluations up to step {entry['step']} (patience "
                               f"{early_stop.patience})"}
    return None


def copy_phase_end(data_config: ml_collections.ConfigDict, history: list[dict]) -> int:
    """The step at which the copy-only phase of a text run's curriculum ends (its batches are
    those of steps 0 .. end - 1): `data_config.copy_only_steps` (0: no such phase), or, with
    `data_config.copy_only_until`, the first periodic validation of `history` ([{"step",
    "copy_accuracy", ...}] in step order) before it whose copy_accuracy reaches that value. A
    pure function of the history, which checkpoints keep, so a resumed run ends the phase where
    an uninterrupted one did."""
    cap, until = data_config.get("copy_only_steps", 0), data_config.get("copy_only_until")
    if until is None:
        return cap
    return next((entry["step"] for entry in history
                 if entry["step"] < cap and entry["copy_accuracy"] >= until), cap)


def steps_to_accuracy(history: list[dict], threshold: float) -> int | None:
    """The step of the first entry of `history` ([{"step", "accuracy", ...}] in step order) whose
    accuracy is >= `threshold`, or None."""
    return next((entry["step"] for entry in history if entry["accuracy"] >= threshold), None)


def _stop(config, step: int, history: list[dict]) -> dict | None:
    """Why the run is finished at `step` after the validation results `history`: the early stop
    (`early_stop_reason` of the evaluations after the copy-only phase, `copy_phase_end`), else
    {"reason": "num_steps", ...} from num_steps on, else None."""
    copy_end = copy_phase_end(config.data, history)
    stop = early_stop_reason(config.early_stop, [e for e in history if e["step"] > copy_end])
    if stop is None and step >= config.num_steps:
        stop = {"reason": "num_steps", "message": f"reached num_steps={config.num_steps}"}
    return stop


def _resume(checkpoints: Checkpoints, params, opt_state, meta: dict):
    """(step, params, opt_state, valid_history, train_window) of the latest checkpoint, or (0,
    params, opt_state, [], []) if none. A checkpoint saved before the history (the window) was
    kept gives [].

    Raises ValueError if the checkpoint's model config differs from `meta["model"]`."""
    step = checkpoints.latest_step()
    if step is None:
        return 0, params, opt_state, [], []
    saved_meta = checkpoints.restore(step)[0]
    # a field the checkpoint predates counts as its default (which keeps the old behaviour)
    saved = {f.name: f.default for f in dataclasses.fields(ModelConfig)} | saved_meta["model"]
    changed = {k: (saved.get(k), v) for k, v in meta["model"].items() if saved.get(k) != v}
    if changed:
        raise ValueError(f"the checkpoint in {checkpoints.directory} is of a different model "
                         f"(field: (saved, now)): {changed}; use a new workdir.")
    _, params, opt_state = checkpoints.restore(step, params, opt_state)
    return (step, params, opt_state, list(saved_meta.get("valid_history", [])),
            list(saved_meta.get("train_window", [])))


def _saved_results(path: Path, step: int, stop: dict | None) -> dict | None:
    """The results a finished run saved at `path` (results.json) when they are of this `step` and
    this stop reason; None otherwise (not finished, not saved, or saved before more training)."""
    if stop is None or not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved if (saved.get("step"), saved.get("stop_reason")) == (step, stop["reason"]) \
        else None


class TrainingDiverged(RuntimeError):
    """A training step diverged (its loss, gradient norm or updated parameters not finite) and
    config.on_divergence does not recover from it (module docstring)."""


def _train_record(config, step: int, pending: list, timed: int, seconds: float,
                  compile_s: float | None) -> dict:
    """The metrics line of the `len(pending)` steps ending at `step`: the means of their (fetched)
    metrics (in float64, so that restored and fresh windows give the same bits), tokens per second
    of the last `timed` of them over `seconds` (None if 0), and `compile_s` when given."""
    means = {k: float(np.mean(np.asarray([m[k] for m in pending], np.float64)))
             for k in pending[0]}
    record = {"step": step, "split": "train", **means,
              "lr": float(learning_rate_schedule(config)(step - 1)),
              "tokens_per_s": (timed * config.batch_size * config.data.seq_len / seconds
                               if timed else None)}
    if compile_s is not None:
        record["compile_s"] = compile_s
    return record


def _log_eval(metrics: MetricsLog, split: str, step: int, result: dict) -> None:
    metrics.write({"step": step, "split": split, **result})
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in result.items() if k != "tokens")
    tqdm.write(f"step {step} {split}: {shown}")


def evaluate_checkpoint(workdir, split: str = "test", *, step: int | None = None,
                        seq_len: int | None = None, batch_size: int | None = None,
                        max_batches: int = 0, model_overrides: dict | None = None) -> dict:
    """Evaluates a checkpoint of `workdir` with the config saved in it.

    Args:
      workdir: a training workdir (its `checkpoints/` is read, never written).
      split: "train", "valid" or "test".
      step: the checkpoint's step (None: the latest).
      seq_len: context length t (None: the config's eval context); synthetic tasks regenerate their
        examples at this length.
      batch_size: None: the config's eval batch size.
      max_batches: evaluate the first batches only (0: the whole split).
      model_overrides: {ModelConfig field: value} for knobs that keep the trained parameters
        (`load_checkpoint`; e.g. {"eidetic_per_chunk": 0, "eidetic_slots": 0}: the eidetic memory
        off at inference).

    Returns:
      `evaluate`'s result plus "step", "split", "seq_len" (and "model_overrides" when given).

    Raises:
      FileNotFoundError: no checkpoint (the message names the path); CheckpointError: unreadable
        or damaged (the message offers the earlier steps).
      ValueError: a bad split, seq_len, batch_size, max_batches or model override; a damaged
        saved tokenizer.

    Warns:
      DataMismatchWarning: the data differs from the data the checkpoint was trained on (both
        fingerprints named).
    """
    check_choice("split", split, data_lib.SPLITS)
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r}: must be an integer >= 1 (or None).")
    if not isinstance(max_batches, int) or max_batches < 0:
        raise ValueError(f"max_batches={max_batches!r}: must be an integer >= 0 (0: all).")
    meta, model_cfg, params = load_checkpoint(workdir, step, model_overrides)
    config = ml_collections.ConfigDict(meta["config"])
    seq_len = seq_len or config.data.eval_seq_len or config.data.seq_len
    data = data_lib.load_data(config, tokenizer=data_lib.load_tokenizer(workdir))  # the run's own
    differences = data_differences(meta.get("data_fingerprint"), data.fingerprints)
    if differences:
        warnings.warn(f"evaluating the checkpoint of step {meta['step']} of {workdir} on other "
                      f"data than it was trained on ({describe_differences(differences)})",
                      DataMismatchWarning, stacklevel=2)
    result = evaluate_split(make_eval_step(model_cfg, oracle_length=oracle_length(config),
                                           separator=document_separator(config, data)), params,
                            data, split,
                            batch_size or config.eval_batch_size or config.batch_size, seq_len,
                            max_batches)
    overrides = {"model_overrides": dict(model_overrides)} if model_overrides else {}
    return {"step": meta["step"], "split": split, "seq_len": seq_len, **overrides, **result}


# --------------------------------------------------------------------------------------------------
# Divergence (config.on_divergence), the run's data and tokenizer (docs/design.md section 3)
# --------------------------------------------------------------------------------------------------


def _at_boundary(config, step: int) -> bool:
    """Whether `step` ends with a training record, a validation or a checkpoint: the points where
    the loop fetches or waits for the step metrics anyway, so checking them there costs no extra
    host sync."""
    return (step % config.log_every == 0 or step % config.eval_every == 0
            or step % config.checkpoint_every == 0 or step >= config.num_steps)


def _diverged_message(at: int, m: dict, last_checkpoint, config) -> str:
    kept = ("no checkpoint was written" if last_checkpoint is None else
            f"the last checkpoint, step {last_checkpoint}, is kept and nothing after it was saved")
    return (f"training diverged at step {at}: loss {float(m['loss'])}, gradient norm "
            f"{float(m['grad_norm'])}; {kept}. Lower config.optimizer.lr (now "
            f"{config.optimizer.lr}) or raise config.optimizer.warmup_steps (now "
            f"{config.optimizer.warmup_steps}), then rerun the command to resume "
            f"(config.on_divergence='skip' or 'rollback' recover on their own).")


class _Divergence:
    """`config.on_divergence` in a run: the NaN test hook, the check of the fetched step metrics at
    each boundary, and what the checkpoints carry ("divergences": the recovered steps, "lr_scale":
    the product of the rollback factors, "valid_finite")."""

    def __init__(self, config, saved_meta: dict | None):
        saved_meta = saved_meta or {}
        self.config = config
        self.events = list(saved_meta.get("divergences", []))
        self.lr_scale = float(saved_meta.get("lr_scale", 1.0))
        self.rollback_step = None  # the checkpoint of a due rollback (None: the initial state)
        self._injected = False
        self._train_config = None

    @property
    def train_config(self) -> ml_collections.ConfigDict:
        """The config with its learning rate scaled by the rollbacks so far."""
        if self.lr_scale == 1.0:
            return self.config
        if self._train_config is None:
            self._train_config = self.config.copy_and_resolve_references()
            self._train_config.optimizer.lr = self.config.optimizer.lr * self.lr_scale
        return self._train_config

    def poison(self, step: int) -> np.float32:
        """The test hook's addend for the update after `step` updates: NaN for the update of
        config.inject_nan_at_step the first time this process reaches it, else 0."""
        if not self._injected and self.config.inject_nan_at_step == step + 1:
            self._injected = True
            return np.float32(np.nan)
        return np.float32(0.0)

    def meta(self, history: list) -> dict:
        return {"divergences": self.events, "lr_scale": self.lr_scale,
                "valid_finite": all(math.isfinite(h["loss"]) for h in history[-1:])}

    def check(self, pending: list, step: int, checkpoints: Checkpoints, metrics) -> bool:
        """Fetches the unchecked step metrics of `pending` (the steps ending at `step`) in place
        and drops their "diverged" flags. A diverged step: "stop" raises `TrainingDiverged`;
        "skip" records it and drops its metrics from `pending` (its update was not applied);
        "rollback" records it and returns True (the caller restores `rollback_step`). Raises
        `TrainingDiverged` past config.max_divergences."""
        fresh = [i for i, m in enumerate(pending) if "diverged" in m]
        if not fresh:
            return False
        for i, m in zip(fresh, jax.device_get([pending[i] for i in fresh])):
            pending[i] = m
        bad = [i for i in fresh if pending[i].pop("diverged")]
        if not bad:
            return False
        at = {i: step - (len(pending) - 1 - i) for i in bad}  # unchecked steps are the last ones
        action, last = self.config.on_divergence, checkpoints.latest_step()
        if action == "stop":
            raise TrainingDiverged(_diverged_message(at[bad[0]], pending[bad[0]], last,
                                                     self.config))
        for i in bad if action == "skip" else bad[:1]:
            self.events.append({"step": at[i], "action": action,
                                "loss": str(float(pending[i]["loss"])),
                                "grad_norm": str(float(pending[i]["grad_norm"]))})
        if len(self.events) > self.config.max_divergences:
            steps = [e["step"] for e in self.events]
            raise TrainingDiverged(
                f"training diverged {len(self.events)} times (steps {steps}), more than "
                f"config.max_divergences={self.config.max_divergences} with "
                f"config.on_divergence={action!r}: " + _diverged_message(
                    at[bad[-1]], pending[bad[-1]], last, self.config).split(": ", 1)[1])
        if action == "skip":
            for i in bad:
                message = (f"loss {float(pending[i]['loss'])}, gradient norm "
                           f"{float(pending[i]['grad_norm'])}: its update was skipped "
                           f"(config.on_divergence='skip'; {len(self.events)} of at most "
                           f"{self.config.max_divergences})")
                tqdm.write(f"step {at[i]}: diverged, {message}")
                metrics.write({"step": at[i], "split": "divergence", "action": "skip",
                               "message": message})
            pending[:] = [m for i, m in enumerate(pending) if i not in at]
            return False
        self.rollback_step = checkpoints.last_good_step()
        self.lr_scale *= self.config.rollback_lr_factor
        self._train_config = None
        tqdm.write(f"step {at[bad[0]]}: diverged (loss {float(pending[bad[0]]['loss'])}, gradient "
                   f"norm {float(pending[bad[0]]['grad_norm'])}); rolling back to "
                   + ("the initial state" if self.rollback_step is None else
                      f"the checkpoint of step {self.rollback_step}")
                   + f" with the learning rate x{self.lr_scale:g} (config.on_divergence="
                   f"'rollback'; {len(self.events)} of at most {self.config.max_divergences})")
        return True

    def record_rollback(self, metrics, step: int) -> None:
        event = self.events[-1]
        metrics.write({"step": step, "split": "rollback", "diverged_at": event["step"],
                       "lr_scale": self.lr_scale,
                       "message": f"diverged at step {event['step']} (loss {event['loss']}); "
                                  f"restarted from step {step} with the learning rate "
                                  f"x{self.lr_scale:g}"})


def _guarded_train_step(model_cfg, config, mesh, guard: _Divergence, separator):
    """`make_train_step` of `guard.train_config` inside one jitted program with the divergence
    check, on the device: `(params, opt_state, inputs, targets, poison) -> (params, opt_state,
    metrics)`, metrics with "diverged" (bool: the loss, the gradient norm or an updated parameter
    is not finite). With on_divergence "skip" a diverged step returns its inputs' parameters and
    optimizer state (the update is not applied). `poison` (`_Divergence.poison`) is added to the
    updated parameters, the loss and the gradient norm when config.inject_nan_at_step is set.
    `separator`: packed documents (`make_train_step`), or None."""
    train_config = guard.train_config
    # the step's Python function: jit options (compiler_options) are for the top-level jit only
    train_step = make_train_step(model_cfg, train_config, mesh, separator=separator).__wrapped__
    skip, poisoned = config.on_divergence == "skip", config.inject_nan_at_step is not None

    def guarded(params, opt_state, inputs, targets, poison):
        new_params, new_opt_state, metrics = train_step(params, opt_state, inputs, targets)
        if poisoned:
            new_params = jax.tree.map(lambda p: p + poison.astype(p.dtype), new_params)
            metrics = {**metrics, "loss": metrics["loss"] + poison,
                       "grad_norm": metrics["grad_norm"] + poison}
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        for leaf in jax.tree.leaves(new_params):
            finite = finite & jnp.all(jnp.isfinite(leaf))
        if skip:
            keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            new_params = jax.tree.map(keep, new_params, params)
            new_opt_state = jax.tree.map(keep, new_opt_state, opt_state)
        return new_params, new_opt_state, {**metrics, "diverged": ~finite}

    options = dict(donate_argnums=(0, 1), compiler_options=compiler_options())
    if mesh is not None:
        params_sharding, opt_sharding = sharding_lib.state_shardings(
            model_cfg, make_optimizer(train_config), mesh)
        batch, replicated = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
        options.update(in_shardings=(params_sharding, opt_sharding, batch, batch, replicated),
                       out_shardings=(params_sharding, opt_sharding, replicated))
    return jax.jit(guarded, **options)


def _roll_back(checkpoints: Checkpoints, step, params, opt_state, model_cfg, config, mesh):
    """(step, params, opt_state, valid_history, train_window) of the checkpoint of `step` (restored
    onto the structure and shardings of `params`, `opt_state`), or of the initial state (None)."""
    if step is None:
        fresh = nnx.split(LanguageModel(model_cfg, rngs=nnx.Rngs(config.seed)), nnx.Param)[1]
        params, opt_state = sharding_lib.shard_tree(
            (fresh, make_optimizer(config).init(fresh)), mesh)
        return 0, params, opt_state, [], []
    meta, params, opt_state = checkpoints.restore(step, params, opt_state)
    return (step, params, opt_state, list(meta.get("valid_history", [])),
            list(meta.get("train_window", [])))


def _saved_tokenizer(workdir: Path):
    """The tokenizer the run saved with its first checkpoint, or None (no checkpoint yet: a fresh
    start builds it from the data, and replaces a file left without a checkpoint).

    Raises ValueError when the saved file is damaged (the message names it)."""
    directory = workdir / "checkpoints"
    if not (directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())):
        return None
    return data_lib.load_tokenizer(workdir)


def _save_tokenizer(workdir: Path, data, checkpoints: Checkpoints) -> None:
    """Saves a text run's tokenizer into the workdir before its first checkpoint (process 0)."""
    if (isinstance(data, data_lib.TextData) and jax.process_index() == 0
            and (checkpoints.latest_step() is None or data_lib.tokenizer_path(workdir) is None)):
        data_lib.save_tokenizer(data.corpus.tokenizer, workdir)


def _check_data(checkpoints: Checkpoints, step, data) -> dict | None:
    """The meta of the checkpoint of `step` (None: none, nothing to check), after checking that
    `data` is what it was trained on: different training data raises ValueError naming both
    fingerprints; a different validation or test split warns (`DataMismatchWarning`)."""
    if step is None:
        return None
    meta = checkpoints.restore(step)[0]
    differences = data_differences(meta.get("data_fingerprint"), data.fingerprints)
    where = checkpoints.directory / str(step)
    if "train" in differences:
        raise ValueError(f"the training data differs from the data the checkpoint {where} was "
                         f"trained on ({describe_differences(differences)}): resuming would "
                         f"train on other data. Restore the original data, or train in a new "
                         f"workdir.")
    if differences:
        warnings.warn(f"the data differs from the checkpoint {where}'s "
                      f"({describe_differences(differences)}): evaluations will not match the "
                      f"earlier ones", DataMismatchWarning, stacklevel=3)
    return meta
