"""Config validation: every bad value names itself and what is allowed."""

import json

import pytest

from bmojo_jax import ModelConfig


@pytest.mark.parametrize("overrides,match", [
    (dict(d_model=30, n_heads=4), "d_model=30 is not divisible by n_heads=4"),
    (dict(window=0), "window=0"),
    (dict(pattern="AXB"), "pattern='AXB'"),
    (dict(eidetic_per_chunk=3, eidetic_slots=10), "eidetic_slots=10 must be a multiple"),
    (dict(eidetic_per_chunk=0, eidetic_slots=4), "eidetic_slots=4 needs eidetic_per_chunk"),
    (dict(eidetic_per_chunk=100), "eidetic_per_chunk=100 exceeds"),
    (dict(ssm_kind="s4"), "ssm_kind='s4'"),
    (dict(implementation="cuda"), "implementation='cuda'"),
    (dict(eidetic_eviction="lru"), "eidetic_eviction='lru'"),
    (dict(d_model=96, n_heads=32), "head_dim = d_model // n_heads = 3 must be even"),
    (dict(innovation_loss_weight=-1.0), "innovation_loss_weight"),
    (dict(innovation_loss_weight=float("nan")), "innovation_loss_weight=nan"),
    (dict(rope_base=0.0), "rope_base=0.0: must be a finite number >= 1"),
    (dict(rope_base=-5.0), "rope_base=-5.0"),
    (dict(eidetic_selection="oracle"), "eidetic_selection='oracle'"),
    (dict(eidetic_threshold=0.0), "eidetic_threshold=0.0"),
    (dict(eidetic_quantile=1.0), r"eidetic_quantile=1.0: must be a number in \(0, 1\)"),
    (dict(eidetic_quantile=float("nan")), "eidetic_quantile=nan"),
    (dict(eidetic_per_chunk=4, eidetic_slots=0), "eidetic_slots=0 must be a positive multiple"),
    (dict(n_layers=0), "n_layers=0"),
    (dict(embedding_dropout=1.0), r"embedding_dropout=1.0: must be a rate in \[0, 1\)"),
    (dict(residual_dropout=-0.1), r"residual_dropout=-0.1: must be a rate in \[0, 1\)"),
    (dict(attention_dropout=float("nan")), "attention_dropout=nan"),
    (dict(residual_dropout="0.1"), "residual_dropout='0.1'"),
    (dict(remat="all"), "remat='all': allowed values are none, block, dots"),
])
def test_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.preset("bmojo", **overrides)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="Unknown preset 'mistral'.*transformer"):
        ModelConfig.preset("mistral")
    with pytest.raises(ValueError, match=r"Unknown ModelConfig field\(s\) \['d_models'\]"):
        ModelConfig.preset("bmojo", d_models=4)


@pytest.mark.parametrize("preset,n_layers,mixers", [
    ("transformer", 3, "AAA"), ("swa", 2, "WW"), ("mamba", 2, "MM"), ("hybrid", 2, "MA"),
    ("hybrid", 6, "MMMAMM"), ("bmojo_f", 2, "FF"), ("bmojo", 2, "BB"),
])
def test_layer_patterns(preset, n_layers, mixers):
    config = ModelConfig.preset(preset, n_layers=n_layers)
    assert config.layer_mixers == mixers
    if preset == "bmojo_f":
        assert config.eidetic_per_chunk == 0 and config.eidetic_slots == 0


# --------------------------------------------------------------------------------------------------
# Config discovery (experiments/config_fields.py) and the sweep grammar (experiments/sweep.py)
# --------------------------------------------------------------------------------------------------


def test_readme_lists_every_config_field_in_sync():
    """The README's table is the one generated from the docstrings (rerun `python -m
    experiments.config_fields --readme` after changing them), and every schema field has a row."""
    from bmojo_jax import training
    from experiments import config_fields
    assert config_fields.readme_section() in config_fields.README.read_text()
    described = [name for pairs, _ in config_fields.field_table() for name, _ in pairs]
    assert sorted(described) == sorted(config_fields.fields(training.default_config()))
    rows = dict((pairs[0][0], meaning) for pairs, meaning in config_fields.field_table())
    assert rows["model.window"].startswith("sliding-window length")
    assert "nats" in rows["early_stop.metric"]


def test_an_undescribed_field_is_named(monkeypatch):
    from bmojo_jax import training
    from experiments import config_fields
    original = training.default_config

    def with_new_field(*args):
        config = original(*args)
        config.new_knob = 3
        return config
    with_new_field.__doc__ = original.__doc__
    monkeypatch.setattr(training, "default_config", with_new_field)
    with pytest.raises(ValueError, match="without a description.*: new_knob"):
        config_fields.field_table()


def test_unknown_field_says_did_you_mean():
    from experiments import config_fields
    from experiments.configs import ptb
    config = ptb.get_config("bmojo")
    assert config_fields.unknown_field(config, "optimizer.lr") is None
    assert config_fields.unknown_field(config, "model") is None
    message = config_fields.unknown_field(config, "optimizer.learning_rate")
    assert "did you mean" in message and "optimizer.lr" in message.split("?")[0]
    assert "the fields of optimizer: b1, b2" in message and "\n" not in message
    assert "did you mean num_steps" in config_fields.unknown_field(config, "num_step")
    assert "num_steps is a value" in config_fields.unknown_field(config, "num_steps.x")
    lines = config_fields.format_config(config).splitlines()
    assert f"optimizer.lr = {config.optimizer.lr!r}" in lines and "model.d_ff = None" in lines
    assert len(lines) == len(config_fields.fields(config))


def test_command_line_typo_exits_with_one_line(capsys):
    from experiments import config_fields
    with pytest.raises(SystemExit) as exit_:
        config_fields.parse_flags(["train", "--config=experiments/configs/tiny.py:bmojo",
                                   "--config.optimizer.learning_rate=1e-3"])
    assert str(exit_.value.code).startswith("error: --config.optimizer.learning_rate: unknown "
                                            "config field")
    assert "optimizer.lr" in str(exit_.value.code)


def test_sweep_grammar_and_point_names():
    from experiments import sweep
    assert sweep.parse_sweep("seed=0,1,2; optimizer.lr=1e-3,3e-3;model.eidetic_selection=fading") \
        == {"seed": [0, 1, 2], "optimizer.lr": [1e-3, 3e-3],
            "model.eidetic_selection": ["fading"]}
    for bad, match in (("seed", "must be FIELD=V1"), ("seed=", "must be FIELD=V1"),
                       ("seed=1;seed=2", "given twice")):
        with pytest.raises(ValueError, match=match):
            sweep.parse_sweep(bad)
    points = list(sweep.grid_points(["swa", "bmojo"], [1e-3, 3e-3], [0, 1],
                                    {"model.window": [8, 16]}))
    assert len(points) == 16 and points[0] == ("swa", 1e-3, 0, {"model.window": 8})
    assert points[1] == ("swa", 1e-3, 1, {"model.window": 8})  # seeds of one setting together
    assert sweep.point_name("bmojo", 3e-3, 1) == "bmojo-lr0.003-s1"  # the running sweeps' names
    assert sweep.point_name("bmojo", 3e-3, 1, {"model.window": 8, "data.path": "a/b"}) == \
        "bmojo-lr0.003-s1-model.window=8-data.path=a_b"
    from experiments.configs import tiny
    name, config = sweep.point_config(tiny.get_config, "bmojo", 3e-3, 2, ["num_steps=7"],
                                      {"model.window": 8})
    assert name == "bmojo-lr0.003-s2-model.window=8"
    assert (config.num_steps, config.model.window, config.seed, config.optimizer.lr) == \
        (7, 8, 2, 3e-3)
    with pytest.raises(ValueError, match="did you mean num_steps"):
        sweep.point_config(tiny.get_config, "bmojo", None, 0, ["num_stepz=7"])
    with pytest.raises(ValueError, match=r"'x' does not fit config.model.window \(int\)"):
        sweep.point_config(tiny.get_config, "bmojo", None, 0, (), {"model.window": "x"})
    with pytest.raises(ValueError, match="point bmojo-lr0.01-s0-model.window=1: config.model"):
        sweep.check_points(tiny.get_config, [("bmojo", None, 0, {"model.window": 1})], ())


def test_sweep_table_mean_std_and_best_lr(tmp_path):
    """Per setting (argument and other swept fields): the best lr by mean validation accuracy,
    mean +- std over its seeds; the caption says what they are."""
    from experiments import sweep

    def record(lr, seed, accuracy, window):
        fields = {"model.window": window}
        return dict(point=sweep.point_name("bmojo", lr, seed, fields), arg="bmojo", lr=lr,
                    seed=seed, fields=fields,
                    result=dict(step=10, valid=dict(accuracy=accuracy, loss=1.0)))
    records = [record(1e-3, 0, 0.5, 8), record(1e-3, 1, 0.7, 8), record(3e-3, 0, 0.9, 8),
               record(3e-3, 1, 0.8, 8), record(1e-3, 0, 0.2, 16)]
    summary = sweep.summarize(records)
    assert list(summary) == ["bmojo model.window=8", "bmojo model.window=16"]
    row = summary["bmojo model.window=8"]
    assert row["lr"] == 3e-3 and row["seeds"] == [0, 1]
    assert row["mean"] == pytest.approx(0.85) and row["std"] == pytest.approx(0.05)
    assert row["points"][0] == "bmojo-lr0.003-s0-model.window=8"
    table = sweep.markdown(summary, tmp_path)
    assert "| bmojo model.window=8 | 0.003 | 0.8500 +- 0.0500 | 0, 1 |" in table
    assert "0.2000 (one seed)" in table and "population std" in table


@pytest.mark.slow
def test_command_lines_print_config_and_refuse_typos(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    def cli(*args):
        return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                              cwd=Path(__file__).parents[1], timeout=300)
    printed = cli("experiments.train", "--config=experiments/configs/ptb.py:bmojo",
                  "--print_config", "--config.optimizer.lr=0.02")
    assert printed.returncode == 0, printed.stderr
    assert "optimizer.lr = 0.02" in printed.stdout.splitlines()
    assert "data.name = 'ptb'" in printed.stdout.splitlines()
    for args in (("experiments.train", "--config=experiments/configs/ptb.py:bmojo",
                  f"--workdir={tmp_path}", "--config.optimizer.learning_rate=1e-3"),
                 ("experiments.sweep", "--config=experiments/configs/mqar.py:bmojo",
                  f"--root={tmp_path}", "--sweep=seed=0;optimizer.learning_rate=1e-3")):
        refused = cli(*args)
        assert refused.returncode == 1
        assert "Traceback" not in refused.stderr
        [line] = refused.stderr.strip().splitlines()
        assert "unknown config field 'optimizer.learning_rate'; did you mean" in line
        assert "optimizer.lr" in line
    assert not any(tmp_path.iterdir())


def test_sweep_rerun_keeps_the_committed_point_record(tmp_path, monkeypatch):
    """Rerunning a finished point returns its OUT/<point>.json untouched (its finish time and
    collection time are the training run's), and a point name that OUT holds with another config
    is refused, naming the file."""
    from experiments import sweep
    from experiments.configs import tiny
    monkeypatch.setattr(sweep, "train_point", lambda config, workdir: {"step": 7, "valid": {}})
    first = sweep.run_point(tiny.get_config, "bmojo", 3e-3, 0, tmp_path / "root",
                            points=sweep.Points(tmp_path / "out"), overrides=["num_steps=7"])
    path = tmp_path / "out" / "bmojo-lr0.003-s0.json"
    written = path.read_text()
    again = sweep.run_point(tiny.get_config, "bmojo", 3e-3, 0, tmp_path / "root",
                            points=sweep.Points(tmp_path / "out"), overrides=["num_steps=7"])
    assert path.read_text() == written and again["finished_utc"] == first["finished_utc"]
    # a record from before a config field existed matches while the field keeps its default
    record = json.loads(written)
    del record["config"]["data"]["copy_fraction"]
    path.write_text(json.dumps(record))
    assert sweep.run_point(tiny.get_config, "bmojo", 3e-3, 0, tmp_path / "root",
                           points=sweep.Points(tmp_path / "out"),
                           overrides=["num_steps=7"])["config"] == record["config"]
    monkeypatch.setattr(sweep, "train_point", lambda config, workdir: pytest.fail(
        "a point whose OUT JSON records another config must be refused before training"))
    with pytest.raises(ValueError, match=r"bmojo-lr0.003-s0.json holds point bmojo-lr0.003-s0 "
                                         r"trained with another config \(fields \['num_steps'\]"):
        sweep.run_point(tiny.get_config, "bmojo", 3e-3, 0, tmp_path / "root",
                        points=sweep.Points(tmp_path / "out"), overrides=["num_steps=8"])


def test_sweep_grid_evaluates_only_the_best_rate(tmp_path, monkeypatch):
    """`run_setting` stops its grid at `stop_above` and measures `evaluate` on the best rate's
    points alone: the other rates' records carry no evaluation; the row's records are the
    evaluated ones."""
    from experiments import sweep
    from experiments.configs import tiny
    accuracy = {1e-3: 0.6, 3e-3: 0.8, 1e-2: 0.99, 3e-2: 1.0}
    monkeypatch.setattr(sweep, "train_point", lambda config, workdir: {
        "step": 7, "stop_reason": "num_steps", "wall_s": 1.0,
        "valid": {"accuracy": accuracy[config.optimizer.lr], "loss": 1.0}})
    evaluated = []
    row = sweep.run_setting(tiny.get_config, "bmojo", [1e-3, 1e-2, 3e-3, 3e-2], [0, 1],
                            tmp_path, stop_above=0.99, overrides=["num_steps=7"],
                            evaluate=lambda workdir: evaluated.append(workdir.name) or "measured")
    assert [r["lr"] for r in row["records"]] == [1e-3, 1e-3, 1e-2, 1e-2]  # stopped at 1e-2
    assert row["lr"] == 1e-2 and evaluated == ["bmojo-lr0.01-s0", "bmojo-lr0.01-s1"]
    assert [r["evaluation"] for r in row["best"]] == ["measured", "measured"]
    assert ["evaluation" in r for r in row["records"]] == [False, False, True, True]


def test_sweep_single_rate_evaluates_each_point_as_it_lands(tmp_path, monkeypatch):
    """With one learning rate, `run_setting` evaluates each point before the next one trains, so
    a stop between points leaves every finished point's record complete."""
    from experiments import sweep
    from experiments.configs import tiny
    calls = []
    monkeypatch.setattr(sweep, "train_point", lambda config, workdir: calls.append(
        f"train {workdir.name}") or {"step": 7, "stop_reason": "num_steps", "wall_s": 1.0,
                                     "valid": {"accuracy": 0.5, "loss": 1.0}})
    row = sweep.run_setting(tiny.get_config, "bmojo", [1e-3], [0, 1], tmp_path,
                            overrides=["num_steps=7"],
                            evaluate=lambda workdir: calls.append(f"evaluate {workdir.name}"))
    assert calls == ["train bmojo-lr0.001-s0", "evaluate bmojo-lr0.001-s0",
                     "train bmojo-lr0.001-s1", "evaluate bmojo-lr0.001-s1"]
    assert all("evaluation" in r for r in row["best"])


def test_length_config_file_trains_the_length_tables_points():
    """experiments/configs/length.py: the `length` table's point config, valid for every preset
    (the sweep CLI runs variants of that table's points from it)."""
    import bmojo_jax as bj
    from bmojo_jax import training
    from experiments.configs import length as config_file
    from experiments.reproduce import length
    for preset in bj.PRESETS:
        config = config_file.get_config(preset)
        training.validate_config(config)
        assert config == length.point_config(preset, length.budgets()["full"])
    assert config_file.get_config("bmojo").data.name == "books"


def test_long_context_config_file_is_valid_for_every_model_of_the_suite():
    """experiments/configs/long_context.py: a valid training config for every preset and
    bmojo_storage (the curriculum's row mix included), the storage knobs on bmojo_storage only,
    every model within 1% of the Transformer's non-embedding parameter count; anything else is
    refused by name."""
    import bmojo_jax as bj
    from bmojo_jax import training
    from experiments.configs import long_context
    counts = {}
    for arg in (*bj.PRESETS, "bmojo_storage"):
        config = long_context.get_config(arg)
        training.validate_config(config)
        assert bool(config.model.storage_slots) == (arg == "bmojo_storage")
        assert config.data.copy_only_steps < config.num_steps
        model_cfg = training.model_config(config, 4096)  # a model used to 64x its context
        assert training.unfilled_eidetic_buffer(model_cfg, config.data.seq_len) is None, arg
        counts[arg] = bj.param_count(model_cfg, embedding=False)
    assert max(counts.values()) < 1.01 * counts["transformer"], counts
    assert min(counts.values()) > 0.99 * counts["transformer"], counts
    with pytest.raises(ValueError, match="'bmojo_storge'"):
        long_context.get_config("bmojo_storge")


def test_unfilled_eidetic_buffer_warns_of_slots_training_never_fills():
    """A B'MOJO buffer that training at seq_len never fills (or score eviction) is named with
    the numbers and the fix; a full one, or a model without eidetic memory, is not."""
    import bmojo_jax as bj
    from bmojo_jax import training
    bmojo = bj.ModelConfig.preset("bmojo", window=64)  # 16 slots, 4 per chunk, lag 2
    message = training.unfilled_eidetic_buffer(bmojo, 256)
    assert "eidetic_slots=16" in message and "at most 8" in message
    assert "seq_len >= 321" in message and "eidetic_slots=8" in message
    assert training.unfilled_eidetic_buffer(bmojo, 321) is None
    assert training.unfilled_eidetic_buffer(bmojo.replace(eidetic_slots=8), 256) is None
    assert "seq_len >= 321" in training.unfilled_eidetic_buffer(bmojo, 128)
    scored = bmojo.replace(eidetic_eviction="score")
    assert "'score'" in training.unfilled_eidetic_buffer(scored, 4096)
    for preset in ("transformer", "bmojo_f"):
        assert training.unfilled_eidetic_buffer(bj.ModelConfig.preset(preset), 16) is None
