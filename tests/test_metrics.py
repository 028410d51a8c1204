"""The records of a training workdir: metrics.jsonl after a resume equals an uninterrupted run's
when the checkpoints fall inside a logging window, its resume rewrite is atomic, the TensorBoard
event files hold the same fields (with the resume's purge), compile time apart from tokens/s,
results.json and re-evaluation of a finished run, provenance in config.json, the run's figure.

One tiny MQAR run (tests/test_training.py's sizes) whose checkpoints (every 3 steps) do not fall on
its logging steps (every 4).
"""

import json
import os
import shutil
import struct

import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from bmojo_jax import training
from bmojo_jax.training import metrics
from experiments.configs import tiny

STEPS = 8


def _config():
    config = tiny.get_config("bmojo")
    config.update(num_steps=STEPS, checkpoint_every=3, log_every=4, eval_every=4, max_to_keep=3)
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, results): checkpoints at steps 3, 6, 8; training records at 4, 8; validation at
    4."""
    workdir = tmp_path_factory.mktemp("metrics_run")
    return workdir, training.train_and_evaluate(_config(), workdir)


def _lines(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in metrics.TIMING_FIELDS} for r in records]


def _scalars(workdir):
    """{(tag, step): value} as TensorBoard reads the event files: in file order, a SessionLog
    START at step s drops the values at steps >= s read before it (a resumed run's purge)."""
    values = {}
    for path in sorted(workdir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):  # TFRecord: length (u64), crc (u32), payload, crc (u32)
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
            i += 16 + length
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                values = {k: v for k, v in values.items() if k[1] < event.step}
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    values[value.tag, event.step] = value.simple_value
    return values


def _resume_from(run, tmp_path, step):
    """A copy of the run killed after its checkpoint of `step` (its later lines still in
    metrics.jsonl), resumed."""
    workdir = tmp_path / "resumed"
    shutil.copytree(run[0], workdir)
    for checkpoint in (workdir / "checkpoints").iterdir():
        if int(checkpoint.name) > step:
            shutil.rmtree(checkpoint)
    return workdir, training.train_and_evaluate(_config(), workdir)


def test_records_compile_time_results_and_provenance(run):
    workdir, results = run
    train = [r for r in _lines(workdir) if r["split"] == "train"]
    assert [r["step"] for r in train] == [4, 8]
    first, second = train
    assert first["compile_s"] > 0 and first["tokens_per_s"] > 0  # steps 2-4 timed, not step 1
    assert "compile_s" not in second and second["tokens_per_s"] > 0
    assert json.loads((workdir / "results.json").read_text()) == results
    provenance = json.loads((workdir / "config.json").read_text())["provenance"]
    assert provenance["jax_version"] == jax.__version__
    assert provenance["devices"].startswith(jax.default_backend())
    assert provenance["git_commit"]
    png = (workdir / "metrics.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_tensorboard_holds_the_jsonl_fields(run):
    workdir = run[0]
    expected = {(f"{r['split']}/{k}", r["step"]): v for r in _lines(workdir)
                for k, v in r.items() if k not in ("step", "split") and isinstance(v, (int, float))
                and not isinstance(v, bool)}
    scalars = _scalars(workdir)
    assert scalars.keys() == expected.keys()
    assert "train/loss" in {tag for tag, _ in scalars} and ("valid_final/accuracy", STEPS) in scalars
    np.testing.assert_allclose([scalars[k] for k in expected], list(expected.values()), rtol=1e-6)


@pytest.mark.slow
def test_resume_inside_a_logging_window_gives_the_same_records(run, tmp_path):
    """Killed after the step-3 checkpoint, inside the logging window 1-4: the step-4 record of the
    resumed run averages steps 1-4 like the uninterrupted run's (the checkpoint holds the metrics
    of steps 1-3), so every line but the timing fields is equal, and so are TensorBoard's values."""
    workdir, resumed = _resume_from(run, tmp_path, 3)
    assert resumed["test"] == run[1]["test"]
    assert _without_timing(_lines(workdir)) == _without_timing(_lines(run[0]))
    resumed_train = [r for r in _lines(workdir) if r["split"] == "train"]
    assert "compile_s" in resumed_train[0]  # the compile time of the resumed start
    timing = tuple(f"train/{field}" for field in metrics.TIMING_FIELDS)
    untimed = lambda scalars: {k: v for k, v in scalars.items() if not k[0].startswith(timing)}  # noqa: E731
    assert untimed(_scalars(workdir)) == untimed(_scalars(run[0]))


@pytest.mark.slow
def test_reevaluate_repeats_the_final_evaluations(run, tmp_path, capsys):
    workdir = tmp_path / "again"
    shutil.copytree(run[0], workdir)
    before = _lines(workdir)
    again = training.train_and_evaluate(_config(), workdir, reevaluate=True)
    assert "evaluating again" in "".join(capsys.readouterr())
    assert again["test"] == run[1]["test"]
    after = _lines(workdir)
    assert after[:len(before)] == before
    assert [r["split"] for r in after[len(before):]] == ["valid_final", "test_final"]


def test_resume_rewrite_is_atomic(tmp_path, monkeypatch):
    """A kill during the rewrite (here: the rename fails) leaves the old file and no temporary
    file; a completed rewrite keeps the lines through the step and drops a half-written line."""
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "split": "train", "loss": 1.0 / s}) for s in (1, 2, 3)]
    original = "\n".join(lines) + '\n{"step": 4, "spl'
    path.write_text(original)

    def killed(*args):
        raise OSError("killed")
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", killed)
        with pytest.raises(OSError, match="killed"):
            metrics.MetricsLog(path, keep_through_step=2)
    assert path.read_text() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    with metrics.MetricsLog(path, keep_through_step=2) as log:
        log.write({"step": 3, "split": "valid", "loss": 0.5, "message": "text"})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert _scalars(tmp_path) == {("valid/loss", 3): 0.5}


def test_plot_metrics_needs_records(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "stop"}) + "\n")
    with pytest.raises(ValueError, match="no training or evaluation record"):
        metrics.plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "m.png")
    assert not (tmp_path / "m.png").exists()
