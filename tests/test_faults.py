"""Fault injection: what a user gets when a run is killed, a checkpoint rots, a step diverges, two
runs share a workdir, the disk fills up, or an input is bad.

Every test is one row of results/reliability.md (`python -m experiments.reliability`): its
docstring says what is tried; `record_property` says what kind of case it is ("fault" or "bad
input"), the outcome a user gets ("clear error", "correct", "lost nothing") and what was observed.
The machinery (the tiny run, the subprocess driver that kills itself at a chosen point, bit
flips) is in experiments/reliability.py.

Training runs in subprocesses (`experiments.train`, exactly as a user runs it) sharing a
persistent JAX compilation cache, so each program compiles once for the module.
"""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import bmojo_jax
from bmojo_jax import data, training
from bmojo_jax.training import workdir as workdir_lib
from experiments import reliability
from tests import helpers

TINY_CORPUS = Path(__file__).parent / "data" / "tiny_corpus"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of the training subprocesses: one compilation cache for the module."""
    return reliability.subprocess_env(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """The workdir of the uninterrupted tiny run (checkpoints at steps 4 and 8)."""
    workdir = tmp_path_factory.mktemp("reference")
    done = reliability.run(reliability.train_command(workdir), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def _records(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _without_timing(records):
    timing = getattr(training.metrics, "TIMING_FIELDS", ("tokens_per_s",))
    return [{k: v for k, v in r.items() if k not in timing} for r in records]


def _steps(workdir):
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir()
                  if p.name.isdigit())


def _one_line_error(done, *patterns) -> str:
    """The command failed with exit status 1 and one "error: ..." line matching `patterns`, and no
    traceback; returns the line."""
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.split("\n") if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-3000:]
    for pattern in patterns:
        assert re.search(pattern, errors[0]), (pattern, errors[0])
    return errors[0]


def _copy(source, tmp_path):
    workdir = tmp_path / "workdir"
    shutil.copytree(source, workdir)
    (workdir / "lock").unlink(missing_ok=True)
    return workdir


def _counts(opt_state):
    """The optimizer's update counters (Adam's and the schedule's)."""
    return {int(np.asarray(x)) for path, x in jax.tree_util.tree_leaves_with_path(opt_state)
            if "count" in jax.tree_util.keystr(path)}


# --------------------------------------------------------------------------------------------------
# Killed runs: exact resume
# --------------------------------------------------------------------------------------------------


def _kill_and_resume(fault, reference, env, tmp_path, record_property):
    workdir = tmp_path / "workdir"
    killed = reliability.run(reliability.train_command(workdir, fault=fault), env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert _steps(workdir) == [4]
    resumed = reliability.run(reliability.train_command(workdir), env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    meta, params, opt_state = reliability.read_state(workdir, 8)
    ref_meta, ref_params, ref_opt_state = reliability.read_state(reference, 8)
    assert reliability.bitwise_equal(params, ref_params)
    assert reliability.bitwise_equal(opt_state, ref_opt_state)
    assert meta["valid_history"] == ref_meta["valid_history"]
    assert _without_timing(_records(workdir)) == _without_timing(_records(reference))
    assert not list((workdir / "checkpoints").glob("*tmp*"))
    record_property("kind", "fault")
    record_property("outcome", "lost nothing")
    record_property("observed", "killed by SIGKILL; resumed from step 4: the step-8 parameters "
                                "and optimizer state are bitwise those of the uninterrupted run, "
                                "metrics.jsonl its lines (timing fields aside)")


@pytest.mark.slow
def test_kill_at_a_checkpoint_boundary(reference, env, tmp_path, record_property):
    """kill -9 right after the checkpoint of step 4 is written, then the same command again."""
    _kill_and_resume({"kill_after_checkpoint": 4}, reference, env, tmp_path, record_property)


@pytest.mark.slow
def test_kill_during_a_checkpoint_write(reference, env, tmp_path, record_property):
    """kill -9 in the middle of writing the checkpoint of step 8 (its parameters written, its
    optimizer state and commit not), then the same command again."""
    _kill_and_resume({"kill_during_checkpoint": 8}, reference, env, tmp_path, record_property)


@pytest.mark.slow
def test_kill_during_the_metrics_rewrite(reference, env, tmp_path, record_property):
    """kill -9 while a resumed run rewrites metrics.jsonl (it drops the lines after its checkpoint
    of step 4), then the same command again."""
    workdir = _copy(reference, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / "8")  # a run stopped after its checkpoint of step 4
    (workdir / "results.json").unlink(missing_ok=True)
    before = (workdir / "metrics.jsonl").read_bytes()
    killed = reliability.run(reliability.train_command(
        workdir, fault={"kill_during_metrics_rewrite": True}), env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (workdir / "metrics.jsonl").read_bytes() == before  # the old file, whole
    resumed = reliability.run(reliability.train_command(workdir), env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, params, opt_state = reliability.read_state(workdir, 8)
    _, ref_params, ref_opt_state = reliability.read_state(reference, 8)
    assert reliability.bitwise_equal((params, opt_state), (ref_params, ref_opt_state))
    assert _without_timing(_records(workdir)) == _without_timing(_records(reference))
    record_property("kind", "fault")
    record_property("outcome", "lost nothing")
    record_property("observed", f"killed by SIGKILL mid-rewrite: metrics.jsonl still the old file "
                                f"({len(before)} bytes, whole); resumed: bitwise the uninterrupted "
                                f"state, its metrics lines (timing fields aside)")


# --------------------------------------------------------------------------------------------------
# Damaged checkpoints
# --------------------------------------------------------------------------------------------------


def _damaged(damage, reference, tmp_path, record_property):
    workdir = _copy(reference, tmp_path)
    where = damage(workdir, 8)
    bad = workdir / "checkpoints" / "8"
    message = rf"{re.escape(str(bad))}.*--step=4"
    resume = lambda w: training.train_and_evaluate(reliability.tiny_config(num_steps=12), w)  # noqa
    for read in (training.load_checkpoint, training.evaluate_checkpoint, bmojo_jax.load, resume):
        with pytest.raises(training.CheckpointError, match=message) as error:
            read(workdir)
    assert _steps(workdir) == [4, 8]  # nothing deleted
    assert training.load_checkpoint(workdir, step=4)[0]["step"] == 4  # the offered one works
    record_property("kind", "fault")
    record_property("outcome", "clear error")
    record_property("observed", f"{where.split('/checkpoints/')[-1]}: {error.value}")


def test_flipped_bit_in_a_checkpoint(reference, tmp_path, record_property):
    """One bit flipped in the stored parameters of the latest checkpoint, then evaluate, load,
    load_checkpoint and resume."""
    _damaged(reliability.flip_bit, reference, tmp_path, record_property)


def test_overwritten_bytes_in_a_checkpoint(reference, tmp_path, record_property):
    """Four bytes of the stored parameters of the latest checkpoint overwritten, then evaluate,
    load, load_checkpoint and resume."""
    _damaged(reliability.overwrite_bytes, reference, tmp_path, record_property)


@pytest.mark.slow
def test_damaged_checkpoint_from_the_command_line(reference, env, tmp_path, record_property):
    """experiments.evaluate on a workdir whose latest checkpoint has a flipped bit."""
    workdir = _copy(reference, tmp_path)
    reliability.flip_bit(workdir, 8)
    evaluated = reliability.run([sys.executable, "-m", "experiments.evaluate",
                                 f"--workdir={workdir}"], env=env)
    line = _one_line_error(evaluated, "is damaged", "--step=4")
    assert _steps(workdir) == [4, 8]
    record_property("kind", "fault")
    record_property("outcome", "clear error")
    record_property("observed", f"exit 1: {line}")


# --------------------------------------------------------------------------------------------------
# Divergence
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_nan_at_step_6_stops(env, tmp_path, record_property):
    """NaN injected into the update of step 6 (config.inject_nan_at_step=6) with
    config.on_divergence="stop" (the default)."""
    workdir = tmp_path / "workdir"
    done = reliability.run(reliability.train_command(
        workdir, changes={"inject_nan_at_step": 6}), env=env)
    line = _one_line_error(done, "training diverged at step 6", "step 4, is kept")
    assert _steps(workdir) == [4]
    meta, params, _ = reliability.read_state(workdir, 4)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    assert all(math.isfinite(r["loss"]) for r in _records(workdir) if "loss" in r)
    record_property("kind", "fault")
    record_property("outcome", "clear error; lost nothing")
    record_property("observed", f"exit 1: {line}")


@pytest.mark.slow
def test_nan_at_step_6_skips_the_update(env, tmp_path, record_property):
    """NaN injected into the update of step 6 with config.on_divergence="skip"."""
    workdir = tmp_path / "workdir"
    done = reliability.run(reliability.train_command(
        workdir, changes={"inject_nan_at_step": 6, "on_divergence": "skip"}), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    meta, params, opt_state = reliability.read_state(workdir, 8)
    assert [(e["step"], e["action"], e["loss"]) for e in meta["divergences"]] == [
        (6, "skip", "nan")]
    assert _counts(opt_state) == {7}  # 8 steps, one update not applied
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    [skipped] = [r for r in _records(workdir) if r["split"] == "divergence"]
    assert skipped["step"] == 6 and skipped["action"] == "skip"
    assert all(math.isfinite(r["loss"]) for r in _records(workdir) if "loss" in r)
    record_property("kind", "fault")
    record_property("outcome", "correct")
    record_property("observed", f"finished at step 8; the optimizer applied 7 updates; metrics: "
                                f"{skipped['message']}")


@pytest.mark.slow
def test_nan_at_step_6_rolls_back(reference, env, tmp_path, record_property):
    """NaN injected into the update of step 6 with config.on_divergence="rollback" (learning rate
    factor 0.5)."""
    workdir = tmp_path / "workdir"
    done = reliability.run(reliability.train_command(
        workdir, changes={"inject_nan_at_step": 6, "on_divergence": "rollback"}), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    meta, params, opt_state = reliability.read_state(workdir, 8)
    assert [(e["step"], e["action"]) for e in meta["divergences"]] == [(6, "rollback")]
    assert meta["lr_scale"] == 0.5 and _counts(opt_state) == {8}
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    records = _records(workdir)
    [rollback] = [r for r in records if r["split"] == "rollback"]
    assert (rollback["step"], rollback["diverged_at"]) == (4, 6)
    # from step 4 on the learning rate is halved; before it the records are the reference's
    lr = {r["step"]: r["lr"] for r in records if r["split"] == "train"}
    ref_lr = {r["step"]: r["lr"] for r in _records(reference) if r["split"] == "train"}
    assert lr[3] == ref_lr[3] and lr[6] == pytest.approx(0.5 * ref_lr[6], rel=1e-6)
    record_property("kind", "fault")
    record_property("outcome", "correct")
    record_property("observed", f"finished at step 8; metrics: {rollback['message']}")


def test_rotation_keeps_the_last_checkpoint_with_finite_validation(tmp_path, record_property):
    """Checkpoint rotation (max_to_keep=2) after checkpoints whose validation was not finite."""
    params = {"w": jnp.ones((3,))}
    with training.Checkpoints(tmp_path / "checkpoints", max_to_keep=2) as checkpoints:
        for step, finite in ((1, True), (2, True), (3, False), (4, False), (5, False)):
            checkpoints.save(step, params, {"m": jnp.zeros((3,))},
                             {"step": step, "valid_finite": finite})
        kept = checkpoints.all_steps()
        assert kept == [2, 4, 5] and checkpoints.last_good_step() == 2
        with pytest.raises(training.CheckpointError, match="NaN or inf"):
            checkpoints.save(6, {"w": jnp.array([1.0, np.nan, 0.0])}, {}, {"step": 6})
        assert checkpoints.all_steps() == [2, 4, 5]
    record_property("kind", "fault")
    record_property("outcome", "lost nothing")
    record_property("observed", f"kept steps {kept}: the newest 2 and step 2, the last with finite "
                                f"validation; non-finite parameters are never saved")


# --------------------------------------------------------------------------------------------------
# Two runs, one workdir
# --------------------------------------------------------------------------------------------------


def _hold_lock(workdir):
    """A process holding the workdir's lock (workdir.py loaded alone: no jax import)."""
    code = ("import importlib.util, sys, time\n"
            f"spec = importlib.util.spec_from_file_location('w', {workdir_lib.__file__!r})\n"
            "w = importlib.util.module_from_spec(spec); spec.loader.exec_module(w)\n"
            "w.WorkdirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(workdir)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_two_runs_on_one_workdir(tmp_path, record_property):
    """A run started on a workdir another process is training in, then that process killed with
    SIGKILL (a stale lock) and the run started again."""
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    holder = _hold_lock(workdir)
    try:
        with pytest.raises(training.WorkdirLocked, match=rf"in use by process {holder.pid} ") as e:
            training.train_and_evaluate(reliability.tiny_config(), workdir)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with training.WorkdirLock(workdir):  # the kernel released the dead holder's lock
        with pytest.raises(training.WorkdirLocked, match=rf"process {os.getpid()} "):
            training.WorkdirLock(workdir).acquire()
    record_property("kind", "fault")
    record_property("outcome", "clear error")
    record_property("observed", f"{str(e.value)[:200]}...; after SIGKILL of the holder the lock is "
                                f"free")


@pytest.mark.slow
def test_two_runs_on_one_workdir_from_the_command_line(env, tmp_path, record_property):
    """experiments.train started on a workdir another process holds."""
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    holder = _hold_lock(workdir)
    try:
        done = reliability.run(reliability.train_command(workdir), env=env)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    line = _one_line_error(done, rf"is in use by process {holder.pid} ")
    assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()
    record_property("kind", "fault")
    record_property("outcome", "clear error")
    record_property("observed", f"exit 1: {line[:220]}...")


# --------------------------------------------------------------------------------------------------
# A full disk (a small tmpfs, where one can be mounted)
# --------------------------------------------------------------------------------------------------

tmpfs = pytest.mark.skipif(not reliability.can_mount_tmpfs(),
                           reason="cannot mount a tmpfs here (unshare -rm)")


@pytest.mark.slow
@tmpfs
def test_disk_full_before_a_checkpoint(env, tmp_path, record_property):
    """The workdir on a 512 KiB tmpfs: too small for the first checkpoint."""
    mount = tmp_path / "mnt"
    done = reliability.run(reliability.on_tmpfs(reliability.train_command(mount / "w"), mount,
                                                "512k"), env=env)
    line = _one_line_error(done, "not enough disk space for the checkpoint of step 4",
                           "Nothing was written")
    record_property("kind", "fault")
    record_property("outcome", "clear error; lost nothing")
    record_property("observed", f"exit 1, {len(done.stderr.split(chr(10)))} stderr lines: {line}")


@pytest.mark.slow
@tmpfs
def test_disk_full_during_a_checkpoint_write(env, tmp_path, record_property):
    """The workdir on a 100 KiB tmpfs and the free-space check off: the disk fills up inside
    orbax's write of the first checkpoint."""
    mount = tmp_path / "mnt"
    done = reliability.run(reliability.on_tmpfs(reliability.train_command(
        mount / "w", fault={"no_space_check": True}), mount, "100k"), env=env)
    line = _one_line_error(done, "cannot write the checkpoint of step 4", "the disk is full",
                           "incomplete files were removed")
    lines = done.stderr.split("\n")
    assert len(lines) < 40, done.stderr[-3000:]  # no flood of asyncio tracebacks
    record_property("kind", "fault")
    record_property("outcome", "clear error; lost nothing")
    record_property("observed", f"exit 1, {len(lines)} stderr lines: {line}")


# --------------------------------------------------------------------------------------------------
# The run's data and tokenizer
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """(workdir, corpus directory, data cache) of a tiny run on 5 .txt files (BPE vocab 300)."""
    root = tmp_path_factory.mktemp("text")
    corpus = root / "corpus"
    shutil.copytree(TINY_CORPUS, corpus)
    config = reliability.tiny_config(**{"data.name": "text_files", "data.path": str(corpus),
                                        "data.bpe_vocab_size": 300, "data.seq_len": 16,
                                        "num_steps": 4, "sample.max_new_tokens": 0})
    config.data.task = ml_collections.ConfigDict()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(data.text.CACHE_ENV, str(root / "cache"))
        training.train_and_evaluate(config, root / "workdir")
    return root / "workdir", corpus, root / "cache", config


def test_text_run_owns_its_tokenizer(text_run, tmp_path, monkeypatch, record_property):
    """A text run's training file changed (a sentence appended), the tokenizer cache emptied, then
    evaluation, load and resume."""
    workdir, corpus, cache, config = text_run
    assert (workdir / "tokenizer.json").is_file()
    monkeypatch.setenv(data.text.CACHE_ENV, str(cache))
    before = training.evaluate_checkpoint(workdir, "valid")
    fingerprint = training.load_checkpoint(workdir)[0]["data_fingerprint"]
    train_docs = data.split_documents(data.read_text_files(corpus))["train"]
    changed = Path(sorted(train_docs)[0])
    original = changed.read_text()
    shutil.rmtree(cache)  # the BPE would be retrained on the changed text
    try:
        changed.write_text(original + " One more sentence, appended later.\n")
        with pytest.warns(training.DataMismatchWarning,
                          match=rf"train: sha256 {fingerprint['train']} when trained, "
                                rf"[0-9a-f]{{64}} now") as warned:
            after = training.evaluate_checkpoint(workdir, "valid")
        assert after["loss"] == before["loss"]  # the saved tokenizer: the same token ids
        resume = config.copy_and_resolve_references()
        resume.num_steps = 8
        with pytest.raises(ValueError, match=rf"training data differs.*train: sha256 "
                                             rf"{fingerprint['train']} when trained, "
                                             rf"[0-9a-f]{{64}} now") as refused:
            training.train_and_evaluate(resume, workdir)
    finally:
        changed.write_text(original)
    model, tokenizer, loaded_config, step = bmojo_jax.load(workdir)
    saved = data.BPETokenizer.load(workdir / "tokenizer.json")
    text = "The clockmaker opened the harbour gate."
    np.testing.assert_array_equal(tokenizer.encode(text), saved.encode(text))
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert (tokenizer.unk_token, tokenizer.unknown_id, step) == (None, None, 4)
    assert tokenizer.encode(text).dtype == np.int32
    record_property("kind", "fault")
    record_property("outcome", "clear error (resume); correct (evaluation warns, same ids)")
    record_property("observed", f"resume: {refused.value}; evaluation: warning "
                                f"({len(warned)}), the same loss {after['loss']:.4f}")


def test_damaged_saved_tokenizer(text_run, tmp_path, record_property):
    """The tokenizer.json of a text run's workdir truncated, then evaluation and load."""
    workdir = _copy(text_run[0], tmp_path)
    path = workdir / "tokenizer.json"
    path.write_text(path.read_text()[:100])
    for read in (bmojo_jax.load, training.evaluate_checkpoint):
        with pytest.raises(ValueError, match=rf"cannot read the tokenizer {re.escape(str(path))}"
                           ) as error:
            read(workdir)
    record_property("kind", "bad input")
    record_property("outcome", "clear error")
    record_property("observed", str(error.value))


def test_load_gives_a_synthetic_task(reference, record_property):
    """bmojo_jax.load on a synthetic-task run, then a greedy continuation of a prompt."""
    model, task, config, step = bmojo_jax.load(reference)
    assert (step, task.name, task.vocab_size, task.unknown_id) == (8, "mqar", 64, None)
    prompt = task.encode("3 17 5 9")
    assert prompt.dtype == np.int32 and task.decode(prompt) == "3 17 5 9"
    new = bmojo_jax.generate(model, prompt[None], 3, temperature=0.0)
    assert new.shape == (1, 3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        task.encode("3 99")
    record_property("kind", "bad input")
    record_property("outcome", "correct")
    record_property("observed", f"{task!r}; encode('3 99'): ValueError")


# --------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------


def test_unwritable_workdir(tmp_path, record_property):
    """A workdir that cannot be created (a file in its path) or written (read-only)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(training.WorkdirError, match=rf"cannot create the workdir "
                                                    rf"{re.escape(str(blocker))}/w") as error:
        training.train_and_evaluate(reliability.tiny_config(), blocker / "w")
    observed = str(error.value)
    readonly = tmp_path / "readonly"
    readonly.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anyway
        with pytest.raises(training.WorkdirError, match="cannot write in the workdir"):
            training.train_and_evaluate(reliability.tiny_config(), readonly)
    record_property("kind", "bad input")
    record_property("outcome", "clear error")
    record_property("observed", observed)


@pytest.mark.slow
def test_unwritable_workdir_from_the_command_line(env, tmp_path, record_property):
    """experiments.train with a --workdir below a regular file."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    done = reliability.run(reliability.train_command(blocker / "w"), env=env)
    line = _one_line_error(done, "cannot create the workdir")
    record_property("kind", "bad input")
    record_property("outcome", "clear error")
    record_property("observed", f"exit 1: {line}")


def test_corrupt_tokenizer_cache(tmp_path, record_property):
    """A damaged file in the BPE tokenizer cache (data_cache/tokenizers/)."""
    docs = data.split_documents(data.read_text_files(TINY_CORPUS))["train"]
    first = data.cached_bpe_tokenizer(docs, 300, "text_files", tmp_path)
    [path] = (tmp_path / "tokenizers").iterdir()
    path.write_text('{"version": "1.0", "truncation": null, "model": {')
    with pytest.warns(UserWarning, match=rf"tokenizer cache {re.escape(str(path))} is damaged"
                      ) as warned:
        again = data.cached_bpe_tokenizer(docs, 300, "text_files", tmp_path)
    text = "The harbour at dawn."
    np.testing.assert_array_equal(again.encode(text), first.encode(text))
    data.BPETokenizer.load(path)  # replaced by a good one
    with pytest.raises(ValueError, match=rf"cannot read the tokenizer {re.escape(str(path))}"):
        path.write_text("not json")
        data.BPETokenizer.load(path)
    record_property("kind", "bad input")
    record_property("outcome", "correct")
    record_property("observed", f"warning: {warned[0].message} (the same tokens after)")


def test_binary_txt_file(tmp_path, record_property):
    """A binary file (PNG bytes; then NUL bytes in UTF-8) among the .txt files of a text_files
    corpus."""
    corpus = tmp_path / "corpus"
    shutil.copytree(TINY_CORPUS, corpus)
    binary = corpus / "06_picture.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(ValueError, match=rf"{re.escape(str(binary))}: not a UTF-8 text file "
                                         rf"\(byte 0x89 at offset 0") as error:
        data.load_corpus("text_files", path=corpus, vocab_size=300, cache_dir=tmp_path)
    binary.write_bytes(b"text\x00\x00\x00more")
    with pytest.raises(ValueError, match=rf"{re.escape(str(binary))}: looks like a binary file"):
        data.read_text_files(corpus)
    record_property("kind", "bad input")
    record_property("outcome", "clear error")
    record_property("observed", str(error.value))


def test_decode_step_with_a_cache_of_another_batch_or_model(record_property):
    """LanguageModel.decode_step given the cache of another batch size, then of another model."""
    model = bmojo_jax.LanguageModel(helpers.config("bmojo"), rngs=nnx.Rngs(0))
    other = bmojo_jax.LanguageModel(helpers.config("bmojo", d_model=32), rngs=nnx.Rngs(0))
    tokens = jnp.array([1, 2], jnp.int32)
    with pytest.raises(ValueError, match="the cache holds batch size 3, the tokens have batch "
                                         "size 2") as batch:
        model.decode_step(tokens, model.init_cache(3))
    with pytest.raises(ValueError, match="the cache was made by another model") as other_model:
        other.decode_step(tokens, model.init_cache(2))
    assert model.decode_step(tokens, model.init_cache(2))[0].shape == (2, helpers.VOCAB)
    record_property("kind", "bad input")
    record_property("outcome", "clear error")
    record_property("observed", f"{batch.value} / {other_model.value}")


def test_batch_size_zero(reference, record_property):
    """Batch size 0: in the config, to evaluate_checkpoint, to the batch functions."""
    config = reliability.tiny_config(batch_size=0)
    with pytest.raises(ValueError, match="config.batch_size=0: must be an integer >= 1") as error:
        training.validate_config(config)
    with pytest.raises(ValueError, match="batch_size=0: must be an integer >= 1"):
        training.evaluate_checkpoint(reference, batch_size=0)
    tokens = np.arange(100, dtype=np.int32)
    synthetic = training.load_data(reliability.tiny_config())
    for call in (lambda: data.lm_eval_batches(tokens, 0, 8), lambda: data.lm_batch(tokens, 0, 8, 0),
                 lambda: data.lm_eval_batches(tokens, 2, 0),
                 lambda: synthetic.eval_batches("valid", 0, 32)):
        with pytest.raises(ValueError, match=r"(batch_size|seq_len)=0: must be an integer >= 1"):
            call()
    record_property("kind", "bad input")
    record_property("outcome", "clear error")
    record_property("observed", str(error.value))


def test_boolean_fields_given_strings(record_property):
    """Non-boolean strings ("no", "false", "maybe") in the boolean fields of a config built from
    a dict (as from JSON)."""
    messages = []
    for field, value in (("distributed", "no"), ("model.tie_embeddings", "false"),
                         ("model.tie_fading_kv", "maybe")):
        values = reliability.tiny_config().to_dict()
        *parents, name = field.split(".")
        node = values
        for key in parents:
            node = node[key]
        node[name] = value
        with pytest.raises(ValueError, match=rf"config.{field}='{value}': must be True or False"
                           ) as error:
            training.validate_config(ml_collections.ConfigDict(values))
        messages.append(str(error.value))
    record_property("kind", "bad input")
    record_property("outcome", "clear error")
    record_property("observed", " / ".join(messages))


NON_FINITE = [("optimizer.lr", math.inf), ("optimizer.lr", math.nan), ("optimizer.eps", 0.0),
              ("optimizer.clip_norm", math.inf), ("optimizer.weight_decay", math.inf),
              ("optimizer.weight_decay", -0.1), ("optimizer.b1", math.nan),
              ("optimizer.min_lr_ratio", 1.5), ("sample.temperature", math.nan),
              ("model.rope_base", 0.0), ("model.rope_base", -5.0),
              ("model.innovation_loss_weight", math.nan), ("model.innovation_loss_weight", -1.0),
              ("model.eidetic_threshold", math.inf), ("early_stop.min_delta", math.inf),
              ("rollback_lr_factor", 0.0), ("rollback_lr_factor", math.nan),
              ("max_divergences", -1), ("inject_nan_at_step", 0)]


@pytest.mark.parametrize("field,value", NON_FINITE)
def test_numeric_field_out_of_range(field, value, record_property):
    """A numeric config field set to NaN, inf or out of its range."""
    config = reliability.tiny_config()
    config.update_from_flattened_dict({field: value})
    name = re.escape(field.split(".")[-1])
    with pytest.raises(ValueError, match=rf"\.{name}={re.escape(repr(value))}: must be") as error:
        training.validate_config(config)
    record_property("kind", "bad input")
    record_property("outcome", "clear error")
    record_property("observed", str(error.value))


def test_early_stop_target_nan(record_property):
    """config.early_stop.target=NaN (it would never be reached)."""
    config = reliability.tiny_config()
    config.early_stop.update(metric="loss", target=math.nan)
    with pytest.raises(ValueError, match="config.early_stop.target=nan: must be") as error:
        training.validate_config(config)
    record_property("kind", "bad input")
    record_property("outcome", "clear error")
    record_property("observed", str(error.value))
