"""The figures' shared rules (experiments/plotting.py) and the figures themselves on tiny data:
every preset one colour and hollow marker, shrinking in drawing order (a point under another
stays visible); a missing point breaks a line; every panel titled and labelled; captions."""

import numpy as np
import pytest

from experiments import plotting


def test_aligned_breaks_lines_at_missing_points():
    rows = [dict(preset="swa", context=1024, ms=1.0), dict(preset="swa", context=4096, ms=3.0),
            dict(preset="bmojo", context=1024, ms=2.0), dict(preset="bmojo", context=2048, ms=None),
            dict(preset="bmojo", context=4096, ms=4.0)]
    series = plotting.aligned(rows, "preset", "context", lambda r: r["ms"])
    assert list(series) == ["swa", "bmojo"]
    xs, ys = series["swa"]
    assert xs == [1024, 2048, 4096]
    np.testing.assert_array_equal(ys, [1.0, np.nan, 3.0])
    np.testing.assert_array_equal(series["bmojo"][1], [2.0, np.nan, 4.0])


def test_series_styles_keep_coinciding_points_visible():
    styles = [plotting.series_style(p, i) for i, p in enumerate(plotting.PRESET_STYLES)]
    assert len({s["marker"] for s in styles}) == len({s["color"] for s in styles}) == len(styles)
    assert all(s["mfc"] == "none" for s in styles)
    sizes = [s["ms"] for s in styles]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert plotting.series_style("bmojo", 0)["marker"] == plotting.series_style("bmojo", 4)["marker"]


def _axes_of(fig_path, monkeypatch, draw):
    """Runs `draw(path)` and returns the axes of the figure it saved (plotting.save spied)."""
    saved = {}
    original = plotting.save

    def spy(fig, path, caption=None):
        saved["axes"], saved["caption"] = fig.axes, caption
        saved["lines"] = [[line.get_ydata() for line in ax.get_lines()] for ax in fig.axes]
        original(fig, path, caption)
    monkeypatch.setattr(plotting, "save", spy)
    draw(fig_path)
    assert fig_path.read_bytes().startswith(b"\x89PNG")
    return saved


def test_length_plot_titles_units_gaps_and_caption(tmp_path, monkeypatch):
    """(The benchmarks' figures follow the same rules; their modules define absl flags that
    collide in one test process, so they are checked by hand.)"""
    import ml_collections
    from experiments.reproduce import length
    s = ml_collections.ConfigDict(dict(seq_len=128, multipliers=[1, 2, 4], seed=0))
    runs = [dict(preset="transformer", perplexity={"128": 10.0, "256": 12.0, "512": 15.0}),
            dict(preset="bmojo", perplexity={"128": 11.0, "512": 11.5})]  # 256 missing
    saved = _axes_of(tmp_path / "length.png", monkeypatch,
                     lambda path: length.plot(dict(runs=runs, eval_tokens=4096), s, path))
    [ax] = saved["axes"]
    assert ax.get_title() and "tokens" in ax.get_xlabel() and "perplexity" in ax.get_ylabel()
    assert "no error bars" in saved["caption"]
    transformer, bmojo = saved["lines"][0][:2]
    assert not np.isnan(transformer).any()
    assert np.isnan(bmojo[1]) and not np.isnan(bmojo[[0, 2]]).any()


def test_mqar_memory_plot_draws_every_point(tmp_path, monkeypatch):
    from experiments.reproduce import mqar_memory

    def row(arg, rule, state_bytes, values, slots=0, recall=None):
        return dict(arg=arg, rule=rule, label=arg, state_bytes=state_bytes, eidetic_slots=slots,
                    fields={}, seeds=[0, 1], test_accuracy=float(np.mean(values)),
                    test_accuracy_std=float(np.std(values)), test_accuracy_values=values,
                    diagnostics=None if recall is None else dict(selection_recall=recall))
    runs = [row("transformer", None, 65540, [0.99, 1.0]), row("swa", None, 4096, [0.02, 0.03]),
            row("bmojo_f", None, 59652, [0.25, 0.26]),
            row("bmojo", "fading", 63412, [0.9, 0.3], slots=8, recall=0.75),
            row("bmojo", "fading", 61000, [0.5, 0.3], slots=4, recall=0.5),
            row("bmojo_oracle", "oracle", 63412, [1.0, 0.99], slots=8, recall=1.0)]
    record = dict(runs=runs, seeds=dict(model_init_and_batch_order=[0, 1], data=0))
    saved = _axes_of(tmp_path / "m.png", monkeypatch,
                     lambda path: mqar_memory.plot(record, None, path))
    left, right, use = saved["axes"]
    # One line per family (the error bars' caps are unmarked lines of their own).
    transformer, swa, bmojo = [line for line in left.get_lines() if line.get_label()[0] != "_"]
    assert transformer.get_markerfacecolor() == "none"  # hollow: later points show inside it
    # B'MOJO's line runs over its slots in order of state size, B'MOJO-F (0 slots) first.
    assert list(bmojo.get_ydata()) == pytest.approx([25.5, 40.0, 60.0])
    # Right: one line per rule over its slots (the mean), a dot per seed, in the rule's colour.
    fading, oracle = [line for line in right.get_lines() if line.get_linestyle() != "None"
                      and line.get_label() in ("fading", "oracle")]
    assert list(fading.get_xdata()) == [4, 8] and list(fading.get_ydata()) == [40.0, 60.0]
    assert list(oracle.get_xdata()) == [8] and list(oracle.get_ydata()) == [99.5]
    dots = [line for line in right.get_lines() if line.get_linestyle() == "None"]
    assert [list(d.get_ydata()) for d in dots] == [[50.0, 30.0], [90.0, 30.0], [100.0, 99.0]]
    assert [d.get_color() for d in dots] == [fading.get_color()] * 2 + [oracle.get_color()]
    assert [ax.get_title() for ax in saved["axes"]][:2] == [
        "accuracy vs decoding-state size", "selection rules over the eidetic slots"]
    # Selection vs use: a marker per B'MOJO row at (its recall, its accuracy), by rule.
    fading, oracle = [line for line in use.get_lines()
                      if line.get_label() in ("fading", "oracle")]
    assert list(fading.get_xdata()) == [0.75, 0.5] and list(fading.get_ydata()) == [60.0, 40.0]
    assert list(oracle.get_xdata()) == [1.0] and list(oracle.get_ydata()) == [99.5]
    assert "a dot per seed" in saved["caption"]