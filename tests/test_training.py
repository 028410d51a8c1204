"""Training machinery: end-to-end train + eval, exact resume, early stopping (and its exact
resume), config errors, checkpoint errors, checkpoint readers, no cached steps.

One tiny MQAR run (2 layers, d_model 32, vocab 64, seq 32) is shared by the module; JAX compile
time dominates, so shapes are few and runs are short.
"""

import dataclasses
import gc
import inspect
import json
import math
import re
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from bmojo_jax import LanguageModel, data, training
from bmojo_jax import config as bj_config
from experiments.configs import books, long_context, mqar, ptb, tiny

STEPS, EVERY = 12, 6


def _tiny_config(**changes):
    config = tiny.get_config("bmojo")
    config.update(num_steps=STEPS, checkpoint_every=EVERY, eval_every=EVERY, log_every=3,
                  **changes)
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, results) of a finished tiny run, checkpoints at steps 6 and 12."""
    workdir = tmp_path_factory.mktemp("tiny")
    return workdir, training.train_and_evaluate(_tiny_config(), workdir)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """(workdir, results) of a tiny run stopped early by patience: evaluations at steps 2, 4, 6 (a
    loss must fall by min_delta=10 relative to count, so none improves on step 2's), stop at 6;
    checkpoints every 2 steps, training lines every 4 (the stop flushes steps 5-6)."""
    workdir = tmp_path_factory.mktemp("stopped")
    return workdir, training.train_and_evaluate(_stopping_config(), workdir)


def _stopping_config():
    config = _tiny_config()
    config.update(eval_every=2, checkpoint_every=2, log_every=4)
    config.early_stop.update(metric="loss", patience=2, min_delta=10.0)
    return config


def _copy(run, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(run[0], workdir)
    return workdir


def _records(workdir, split):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def _params(workdir, step):
    return training.load_checkpoint(workdir, step)[2]


def test_train_and_evaluate_end_to_end(run):
    workdir, results = run
    train = _records(workdir, "train")
    assert [r["step"] for r in train] == [3, 6, 9, 12]
    assert train[-1]["loss"] < train[0]["loss"]
    for r in train:  # the loss adds B'MOJO's sown innovation loss to the cross-entropy
        assert r["aux_loss"] > 0 and r["tokens_per_s"] > 0
        assert r["loss"] == pytest.approx(r["ce"] + r["aux_loss"], rel=1e-5)
    assert [r["step"] for r in _records(workdir, "valid")] == [EVERY]
    assert results["step"] == STEPS
    for split in ("valid", "test"):
        assert math.isfinite(results[split]["perplexity"]) and 0 <= results[split]["accuracy"] <= 1
        assert results[split]["tokens"] == 16 * 4  # num_eval examples x num_kv_pairs labels
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["12", "6"]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["pattern"] == "B" and saved["config"]["num_steps"] == STEPS


def test_resume_is_exact(run, tmp_path):
    """Stopped after the step-6 checkpoint and restarted: the same step-12 parameters and the same
    metrics as the uninterrupted run."""
    workdir = _copy(run, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / str(STEPS))
    resumed = training.train_and_evaluate(_tiny_config(), workdir)
    jax.tree.map(np.testing.assert_array_equal, _params(workdir, STEPS), _params(run[0], STEPS))
    assert resumed["test"] == run[1]["test"]
    assert _without_rates(_records(workdir, "train")) == _without_rates(_records(run[0], "train"))


def _without_rates(records):
    return [{k: v for k, v in r.items() if k not in training.metrics.TIMING_FIELDS}
            for r in records]


def _all_records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_early_stop_saves_records_and_evaluates(stopped):
    workdir, results = stopped
    assert results["step"] == 6 and results["stop_reason"] == "patience"
    assert [r["step"] for r in _records(workdir, "valid")] == [2, 4, 6]
    assert [r["step"] for r in _records(workdir, "train")] == [4, 6]
    [stop] = _records(workdir, "stop")
    assert stop["step"] == 6 and stop["reason"] == "patience"
    assert "for 2 evaluations up to step 6 (patience 2)" in stop["message"]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4, 6]
    assert [r["split"] for r in _all_records(workdir)][-3:] == ["stop", "valid_final",
                                                                "test_final"]
    [final] = _records(workdir, "valid_final")
    evaluated = _records(workdir, "valid") + [final]
    assert results["steps_to_0.9"] == final["steps_to_0.9"] == training.loop.steps_to_accuracy(
        evaluated, 0.9)
    assert results["valid"]["accuracy"] == final["accuracy"]


def test_early_stop_resume_is_exact(stopped, tmp_path):
    """Killed after the step-4 checkpoint: the resumed run restores the validation history of the
    checkpoint, so it stops at step 6 too (without it, patience would count from step 6), with the
    same parameters and the same metrics file."""
    workdir = _copy(stopped, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / "6")
    resumed = training.train_and_evaluate(_stopping_config(), workdir)
    assert resumed["step"] == 6 and resumed["stop_reason"] == "patience"
    jax.tree.map(np.testing.assert_array_equal, _params(workdir, 6), _params(stopped[0], 6))
    assert resumed["test"] == stopped[1]["test"]
    assert _without_rates(_all_records(workdir)) == _without_rates(_all_records(stopped[0]))


def test_rerunning_a_finished_workdir_trains_no_further(run, stopped, tmp_path, capsys):
    """Stopped early or at num_steps: no training, no evaluation, the reason printed, the saved
    results returned (tests/test_metrics.py: reevaluate=True)."""
    for (source, results), config, reason in (
            (run, _tiny_config(), "reached num_steps=12"),
            (stopped, _stopping_config(), "validation loss has not improved")):
        workdir = tmp_path / source.name
        shutil.copytree(source, workdir)
        before = _all_records(workdir)
        again = training.train_and_evaluate(config, workdir)
        printed = "".join(capsys.readouterr())
        assert f"already finished at step {results['step']} ({reason}" in printed
        assert "not training further" in printed
        assert (again["step"], again["stop_reason"]) == (results["step"], results["stop_reason"])
        assert again["test"] == results["test"]
        assert _all_records(workdir) == before
        assert (sorted(p.name for p in (workdir / "checkpoints").iterdir())
                == sorted(p.name for p in (source / "checkpoints").iterdir()))


def test_early_stop_rules():
    """Targets stop at the first evaluation that reaches them; patience counts evaluations that do
    not improve on the best by min_delta relative; a prefix of a history gives the decision the run
    gave there."""
    rule = lambda **fields: ml_collections.ConfigDict(
        dict(dict(metric=None, target=None, patience=None, min_delta=0.0), **fields))
    history = lambda metric, values: [{"step": 2 * (i + 1), metric: v}
                                      for i, v in enumerate(values)]
    decide = training.loop.early_stop_reason
    accuracy = history("accuracy", [0.5, 0.995, 0.2])
    assert decide(rule(), accuracy) is None
    stop = decide(rule(metric="accuracy", target=0.99), accuracy)
    assert stop == {"reason": "target",
                    "message": "validation accuracy 0.995 >= target 0.99 at step 4"}
    assert decide(rule(metric="accuracy", target=0.99), accuracy[:1]) is None
    assert decide(rule(metric="perplexity", target=1.5),
                  history("perplexity", [3.0, 1.5]))["reason"] == "target"
    # best 1.0; 0.95 is not 10% better; 0.85 is (best 0.85); 0.8 and 0.77 are not: stop at step 10
    losses = history("loss", [1.0, 0.95, 0.85, 0.8, 0.77])
    patience = rule(metric="loss", patience=2, min_delta=0.1)
    assert decide(patience, losses[:4]) is None
    assert decide(patience, losses)["reason"] == "patience"
    assert "up to step 10" in decide(patience, losses)["message"]
    patience.min_delta = 0.0
    assert decide(patience, losses) is None  # every evaluation improves a little
    assert training.loop.steps_to_accuracy(accuracy, 0.9) == 4
    assert training.loop.steps_to_accuracy(accuracy[:1], 0.9) is None


def test_evaluate_checkpoint_matches_final_eval(run):
    result = training.evaluate_checkpoint(run[0], "test")
    assert result["step"] == STEPS and result["seq_len"] == 32
    assert result["loss"] == pytest.approx(run[1]["test"]["loss"], rel=1e-6)
    assert result["accuracy"] == run[1]["test"]["accuracy"]


def test_corrupt_checkpoint_gives_clear_error_and_deletes_nothing(run, tmp_path):
    workdir = _copy(run, tmp_path)
    bad = workdir / "checkpoints" / str(STEPS)
    for f in (bad / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"not a checkpoint")
    with pytest.raises(training.CheckpointError, match=re.escape(str(bad))):
        training.train_and_evaluate(_tiny_config(), workdir)
    with pytest.raises(training.CheckpointError, match=re.escape(str(bad))):
        training.evaluate_checkpoint(workdir)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["12", "6"]
    assert training.evaluate_checkpoint(workdir, step=EVERY)["step"] == EVERY


def test_load_model_gives_the_trained_model(run):
    """`load_model` (built abstractly) = a concrete model restored from the same checkpoint."""
    model, config, step = training.load_model(run[0])
    assert step == STEPS and config.to_dict() == json.loads(json.dumps(_tiny_config().to_dict()))
    reference = LanguageModel(training.model_config(_tiny_config(), 64), rngs=nnx.Rngs(1))
    with training.Checkpoints(run[0] / "checkpoints", create=False) as checkpoints:
        nnx.update(reference, checkpoints.restore(STEPS, nnx.state(reference, nnx.Param))[1])
    logits = nnx.jit(lambda m, x: m(x))  # equal graphdefs: one compile serves both
    tokens = np.arange(32, dtype=np.int32)[None] % 64
    np.testing.assert_array_equal(logits(model, tokens), logits(reference, tokens))
    assert training.load_model(run[0], step=EVERY)[2] == EVERY


def test_model_overrides_run_the_trained_weights_with_another_memory(run):
    """`model_overrides`: the eidetic memory turned off at inference = a model built without it
    that holds the checkpoint's parameters; an override that changes nothing changes nothing;
    knobs that change the parameters, unknown fields and invalid values are clear errors."""
    off = dict(eidetic_per_chunk=0, eidetic_slots=0)
    trained, _, _ = training.load_model(run[0])
    model, _, _ = training.load_model(run[0], model_overrides=off)
    reference = LanguageModel(dataclasses.replace(trained.config, **off), rngs=nnx.Rngs(1))
    saved = dict(nnx.to_flat_state(nnx.state(trained, nnx.Param)))
    for path, variable in nnx.to_flat_state(nnx.state(reference, nnx.Param)):
        variable[...] = saved[path][...]
    tokens = np.arange(64, dtype=np.int32)[None] % 64  # 4 chunks: lag-2 slots are read
    np.testing.assert_array_equal(model(tokens), reference(tokens))
    assert not np.allclose(model(tokens), trained(tokens), atol=1e-4)
    # the same on a model in memory (the model itself unchanged), and through `load`
    in_memory = training.with_overrides(trained, off)
    np.testing.assert_array_equal(in_memory(tokens), reference(tokens))
    assert trained.config.eidetic_slots > 0 and in_memory.config.eidetic_slots == 0
    np.testing.assert_array_equal(training.load(run[0], model_overrides=off).model(tokens),
                                  reference(tokens))
    with pytest.raises(ValueError, match="change the parameters"):
        training.with_overrides(trained, {"d_model": 64})
    base = training.evaluate_checkpoint(run[0], "test", seq_len=48)
    same = training.evaluate_checkpoint(run[0], "test", seq_len=48, model_overrides=dict(
        eidetic_selection=trained.config.eidetic_selection))
    assert same.pop("model_overrides") and same == base
    without = training.evaluate_checkpoint(run[0], "test", seq_len=48, model_overrides=off)
    assert without["model_overrides"] == off and without["loss"] != base["loss"]
    for overrides, match in (({"d_model": 64}, "change the parameters"),
                             ({"widow": 8}, r"\['widow'\] are not ModelConfig fields"),
                             ({"eidetic_slots": 3}, r"model_overrides \{'eidetic_slots': 3\}: "
                                                    "ModelConfig.eidetic_slots=3")):
        with pytest.raises(ValueError, match=match):
            training.load_checkpoint(run[0], model_overrides=overrides)


def test_steps_are_not_cached():
    """Each build is a new function that dies with its caller (no module-level cache)."""
    model_cfg, config = training.model_config(_tiny_config(), 64), _tiny_config()
    for build in (lambda: training.make_train_step(model_cfg, config),
                  lambda: training.make_eval_step(model_cfg)):
        step = build()
        assert build() is not step
        alive = weakref.ref(step)
        del step
        gc.collect()
        assert alive() is None


def test_missing_checkpoint_gives_clear_error(run, tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "checkpoints"))):
        training.evaluate_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 7 .*saved steps: \[6, 12\]"):
        training.evaluate_checkpoint(run[0], step=7)


def test_resume_with_a_different_model_fails(run, tmp_path):
    workdir = _copy(run, tmp_path)
    config = _tiny_config()
    config.model.window = 8
    with pytest.raises(ValueError, match="different model.*'window': \\(16, 8\\)"):
        training.train_and_evaluate(config, workdir)


@pytest.mark.parametrize("changes,match", [
    ({"model_preset": "lstm"}, "config.model_preset='lstm': allowed values are transformer"),
    ({"data.name": "wikitext"}, "config.data.name='wikitext': allowed values are ptb"),
    ({"num_steps": 0}, "config.num_steps=0: must be an integer >= 1"),
    ({"batch_size": -2}, "config.batch_size=-2: must be an integer >= 1"),
    ({"optimizer.lr": -1.0}, "config.optimizer.lr=-1.0: must be a number > 0"),
    ({"optimizer.b2": 1.0}, r"config.optimizer.b2=1.0: must be a number in \[0, 1\)"),
    ({"optimizer.schedule": "linear"}, "config.optimizer.schedule='linear': allowed values"),
    ({"optimizer.warmup_steps": 100}, "warmup_steps=100 exceeds config.num_steps=12"),
    ({"optimizer.warmup_steps": 12}, "warmup_steps=12 equals config.num_steps: the cosine"),
    ({"model.n_heads": 3}, "not divisible by n_heads=3"),
    ({"data.name": "text_files"}, "config.data.path: data.name='text_files' needs"),
    ({"early_stop.target": 0.99}, "config.early_stop.target=0.99 needs config.early_stop.metric"),
    ({"early_stop.metric": "bleu"}, "config.early_stop.metric='bleu': allowed values are accuracy"),
    ({"early_stop.metric": "accuracy"},
     "set config.early_stop.target or config.early_stop.patience"),
    ({"early_stop.metric": "accuracy", "early_stop.target": 1.5},
     r"config.early_stop.target=1.5: must be a number in \[0, 1\] for the metric 'accuracy'"),
    ({"early_stop.metric": "perplexity", "early_stop.target": 0.5},
     "config.early_stop.target=0.5: must be a number >= 1 for the metric 'perplexity'"),
    ({"early_stop.metric": "loss", "early_stop.patience": 0},
     "config.early_stop.patience=0: must be an integer >= 1"),
    ({"early_stop.metric": "loss", "early_stop.patience": 2, "early_stop.min_delta": -0.1},
     "config.early_stop.min_delta=-0.1: must be a number >= 0"),
    ({"early_stop.metric": "loss", "early_stop.patience": 2, "eval_every": 12},
     "needs periodic validation evaluations, but config.eval_every=12 >= config.num_steps=12"),
    ({"on_divergence": "retry"}, "config.on_divergence='retry': allowed values are stop, skip, "
                                 "rollback"),
    ({"rollback_lr_factor": 1.0}, r"config.rollback_lr_factor=1.0: must be a number in \(0, 1\)"),
    ({"optimizer.weight_decay": float("inf")},
     "config.optimizer.weight_decay=inf: must be a finite number"),
    ({"model.rope_base": float("nan")}, "config.model.rope_base=nan: must be a finite number"),
    ({"data.packed_documents": True}, "config.data.packed_documents: the synthetic task 'mqar'"),
    ({"data.packed_documents": True, "data.name": "ptb", "data.task": {},
      "model.eidetic_selection": "state"}, "eidetic_selection='state' reads across documents"),
    ({"data.retrieval_fraction": 0.5}, "config.data.retrieval_fraction=0.5: corpora only"),
    ({"data.retrieval_fraction": -0.1, "data.name": "ptb", "data.task": {}},
     r"config.data.retrieval_fraction=-0.1: must be a number in \[0, 1\]"),
    ({"data.copy_fraction": 0.25}, "config.data.copy_fraction=0.25: corpora only"),
    ({"data.retrieval_fraction": 0.75, "data.copy_fraction": 0.5, "data.name": "ptb",
      "data.task": {}}, "config.data.retrieval_fraction=0.75 and config.data.copy_fraction=0.5: "
                        "together at most 1"),
    ({"data.copy_only_steps": -1, "data.name": "ptb", "data.task": {}},
     "config.data.copy_only_steps=-1: must be an integer >= 0"),
    ({"data.retrieval_labels": "prompt"},
     "config.data.retrieval_labels='prompt': allowed values are all, answer"),
    ({"early_stop.metric": "retrieval_exact", "early_stop.target": 0.9},
     "metric='retrieval_exact' is measured on held-out retrieval rows, which only a run with "
     "config.data.retrieval_fraction > 0 evaluates"),
    ({"early_stop.metric": "copy_accuracy", "early_stop.target": 0.9},
     "metric='copy_accuracy' is measured on held-out copy rows, which only a run with "
     "config.data.copy_fraction or copy_only_steps > 0 evaluates"),
    ({"data.copy_only_until": 0.0}, "config.data.copy_only_until=0.0: corpora only"),
    ({"data.copy_only_until": 1.5, "data.name": "ptb", "data.task": {}},
     r"config.data.copy_only_until=1.5: must be None or a number in \[0, 1\]"),
    ({"data.copy_only_until": 0.5, "data.copy_only_steps": 6, "data.name": "ptb",
      "data.task": {}}, "config.data.copy_only_until=0.5 ends the copy-only phase at a periodic "
                        "validation within its cap config.data.copy_only_steps=6; it needs "
                        "copy_only_steps > config.eval_every=6"),
])
def test_bad_config_values_raise_clear_errors(changes, match):
    config = _tiny_config()
    config.update_from_flattened_dict(changes)
    with pytest.raises(ValueError, match=match):
        training.validate_config(config)


def test_early_stop_on_accuracy_needs_a_synthetic_task():
    config = ptb.get_config("bmojo")
    config.early_stop.update(metric="accuracy", target=0.9)
    with pytest.raises(ValueError, match="config.early_stop.metric='accuracy': only synthetic "
                                         "tasks report accuracy, config.data.name='ptb'"):
        training.validate_config(config)
    config.early_stop.metric = "perplexity"
    config.early_stop.target = 120.0
    training.validate_config(config)


def test_task_arguments_reach_the_generator():
    """config.data.task.query_start reaches `mqar` (every label at >= 20); an argument the
    generator does not take, or one the pipeline sets, is a clear error."""
    config = _tiny_config()
    config.data.task.query_start = 20
    training.validate_config(config)
    source = training.load_data(config)
    for _, targets in [source.train, *source.eval_batches("valid", 8, 32)]:
        assert np.all(np.nonzero(targets != data.IGNORE_INDEX)[1] >= 20)
    for name in ("query_begin", "seed", "input_seq_len"):
        config = _tiny_config()
        config.data.task[name] = 3
        with pytest.raises(ValueError, match=rf"task arguments \['{name}'\]: the synthetic task "
                                             rf"'mqar' does not take them here; allowed: "
                                             rf"num_kv_pairs, num_passes, power_a, query_start"):
            training.load_data(config)


def test_unknown_and_missing_fields_raise_clear_errors():
    config = _tiny_config()
    config.unlock()
    config.num_step = 5
    with pytest.raises(ValueError, match="config.num_step: unknown config field"):
        training.validate_config(config)
    config = _tiny_config()
    config.data.task = {"num_kv_pairs": 4}
    with pytest.raises(ValueError, match="config.data.task.vocab_size: required"):
        training.validate_config(config)


@pytest.mark.parametrize("module", [ptb, mqar, books, tiny, long_context])
@pytest.mark.parametrize("preset", ["transformer", "swa", "mamba", "hybrid", "bmojo_f", "bmojo"])
def test_experiment_configs_are_valid(module, preset):
    config = module.get_config(preset)
    training.validate_config(config)
    assert config.model_preset == preset


def test_model_config_applies_overrides_to_the_preset():
    config = _tiny_config()
    assert training.model_config(config, 64).pattern == "B"
    config.model_preset = "bmojo_f"
    config.model.update(eidetic_per_chunk=None, eidetic_slots=None)
    model = training.model_config(config, 99)
    assert (model.pattern, model.eidetic_slots, model.d_model, model.vocab_size) == ("F", 0, 32, 99)


def test_weight_decay_mask_excludes_vectors_and_ssm_dynamics():
    model = LanguageModel(training.model_config(_tiny_config(), 64), rngs=nnx.Rngs(0))
    mask = training.weight_decay_mask(nnx.split(model, nnx.Param)[1])
    decays = {jax.tree_util.keystr(path): decay
              for path, decay in jax.tree_util.tree_leaves_with_path(mask)}
    for name in ("A_log", "dt_bias", "['D']", "scale", "bias"):
        assert not any(decay for path, decay in decays.items() if name in path), name
    for name in ("embedding", "wq", "in_proj", "['mlp']"):
        assert all(decay for path, decay in decays.items() if name in path), name


def test_learning_rate_schedule():
    config = _tiny_config()
    config.optimizer.update(lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    schedule = training.learning_rate_schedule(config)
    assert [float(schedule(s)) for s in (0, 1, 2)] == pytest.approx([0.0, 0.5, 1.0])
    assert float(schedule(STEPS)) == pytest.approx(0.1)
    config.optimizer.schedule = "constant"
    assert float(training.learning_rate_schedule(config)(STEPS)) == pytest.approx(1.0)


def test_synthetic_batches_are_a_function_of_the_step():
    config = _tiny_config(batch_size=100)  # 256 examples: step 2 crosses into the second epoch
    first, second = training.load_data(config), training.load_data(config)
    for step in (0, 2, 7):
        np.testing.assert_array_equal(first.train_batch(step)[0], second.train_batch(step)[0])
    epoch = np.concatenate([first.train_batch(0)[0], first.train_batch(1)[0],
                            first.train_batch(2)[0][:56]])
    np.testing.assert_array_equal(np.unique(epoch, axis=0), np.unique(first.train[0], axis=0))


def test_every_synthetic_task_has_its_length_argument():
    assert set(data.SEQ_LEN_ARGUMENTS) == set(data.SYNTHETIC_TASKS)
    for name, argument in data.SEQ_LEN_ARGUMENTS.items():
        assert argument in inspect.signature(data.SYNTHETIC_TASKS[name]).parameters, name


def test_token_nll_is_masked_cross_entropy():
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5))
    targets = np.array([[1, -100, 4], [-100, -100, 0]], np.int32)
    nll, mask = training.token_nll(logits, targets)
    log_p = np.asarray(jax.nn.log_softmax(logits))
    expected = np.array([[-log_p[0, 0, 1], 0, -log_p[0, 2, 4]], [0, 0, -log_p[1, 2, 0]]])
    np.testing.assert_allclose(np.asarray(nll), expected, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(mask), targets != -100)


@pytest.mark.slow
def test_command_line_train_then_evaluate(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                              cwd=Path(__file__).parents[1], timeout=300)

    bad = cli("experiments.train", "--config=experiments/configs/tiny.py:mamba",
              f"--workdir={tmp_path}", "--config.num_steps=0")
    assert bad.returncode == 1 and "error: config.num_steps=0: must be an integer >= 1" in bad.stderr
    done = cli("experiments.train", "--config=experiments/configs/tiny.py:mamba",
               f"--workdir={tmp_path}", "--config.num_steps=4", "--config.optimizer.warmup_steps=1",
               "--config.model.d_model=16", "--config.model.n_heads=1")
    assert done.returncode == 0, done.stderr
    assert training.model_config(ml_collections.ConfigDict(
        json.loads((tmp_path / "config.json").read_text())["config"]), 64).d_model == 16
    evaluated = cli("experiments.evaluate", f"--workdir={tmp_path}", "--split=valid",
                    "--attention_mass")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["step"] == 4 and 0 <= result["accuracy"] <= 1
    assert result["workdir"] == str(tmp_path) and result["git_commit"] and result["machine"]
    assert result["attention_mass"] == {}  # no B layer
    bad = cli("experiments.evaluate", f"--workdir={tmp_path}", "--set=d_model=32")
    assert bad.returncode == 1 and "error: model_overrides {'d_model': 32} change the parameters" \
        in bad.stderr


def test_divergence_stops_before_a_nan_checkpoint(run, tmp_path):
    """A finished run continued at a huge learning rate goes NaN: training stops with a clear
    TrainingDiverged, the good checkpoints stay, and no NaN line reaches metrics.jsonl."""
    workdir = _copy(run, tmp_path)
    config = _tiny_config()
    config.num_steps, config.optimizer.lr = 2 * STEPS, 1e6
    with pytest.raises(training.TrainingDiverged, match=r"diverged at step .*step 12, is kept"):
        training.train_and_evaluate(config, workdir)
    assert training.load_checkpoint(workdir)[0]["step"] == STEPS
    assert all(math.isfinite(r["loss"]) for r in _records(workdir, "train"))
    with pytest.raises(ValueError, match="config.optimizer.lr=inf"):
        config.optimizer.lr = float("inf")
        training.validate_config(config)


def test_mqar_far_config_accepts_every_rule():
    """Every argument of experiments/configs/mqar_far.py is a valid training config (the rules
    of ModelConfig.eidetic_selection and the oracle), and a bad one names the choices."""
    from experiments.configs import mqar_far
    for arg in ["transformer", "swa", "mamba", "bmojo_f", "bmojo"] + [
            f"bmojo_{rule}" for rule in mqar_far.RULES]:
        training.validate_config(mqar_far.get_config(arg))
    assert set(mqar_far.RULES) - {"oracle"} == set(bj_config.SELECTIONS)
    with pytest.raises(ValueError, match="bmojo_oracle"):
        mqar_far.get_config("bmojo_lru")


def test_long_context_config_has_a_storage_variant():
    config = long_context.get_config("bmojo_storage")
    training.validate_config(config)
    assert (config.model_preset, config.model.storage_slots) == ("bmojo", 16_384)
    assert config.data.retrieval_fraction > 0
    with pytest.raises(ValueError, match="bmojo_storage"):
        long_context.get_config("bmojo_lru")


def test_packed_documents_score_each_document_alone():
    """config.data.packed_documents: the eval step finds a window's documents from the
    end-of-text id and scores each as if it ran alone; the target after a separator (the next
    document's first token) is not scored. A synthetic task has no documents to pack."""
    model_cfg = bj_config.ModelConfig.preset("bmojo", vocab_size=64, d_model=16, n_heads=2,
                                             window=4, chunk_size=4, d_state=4, ssm_head_dim=8,
                                             eidetic_per_chunk=1, eidetic_slots=2)
    model = LanguageModel(model_cfg, rngs=nnx.Rngs(0))
    separator, t = 63, 24
    tokens = np.array(jax.random.randint(jax.random.PRNGKey(0), (1, t + 1), 0, separator))
    tokens[0, [7, 15]] = separator  # documents [0, 8), [8, 16), [16, 24]: starts at window edges
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    segment_ids, masked = data.document_segments(inputs, targets, separator)
    assert segment_ids.tolist() == [[0] * 8 + [1] * 8 + [2] * 8]
    assert (np.asarray(masked) < 0).sum() == 2
    params = nnx.state(model, nnx.Param)
    packed = training.make_eval_step(model_cfg, separator=separator)(params, inputs, targets)
    plain = training.make_eval_step(model_cfg)
    alone = [plain(params, inputs[:, lo:hi], np.asarray(masked)[:, lo:hi])
             for lo, hi in ((0, 8), (8, 16), (16, 24))]
    assert int(packed["tokens"]) == t - 2 == sum(int(a["tokens"]) for a in alone)
    np.testing.assert_allclose(float(packed["nll_sum"]),
                               sum(float(a["nll_sum"]) for a in alone), rtol=1e-5)
    config = _tiny_config()
    config.data.packed_documents = True
    with pytest.raises(ValueError, match="has no documents to pack"):
        training.document_separator(config, data.load_data(config))
