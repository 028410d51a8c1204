"""experiments.curves: the validation records of a workdir, in step order, a killed run's torn
line skipped; a clear error without metrics.jsonl; a figure with a panel per metric."""

import json

import pytest

from experiments import curves


def test_valid_curve_and_plot(tmp_path):
    lines = [json.dumps({"step": 200, "split": "valid", "loss": 1.0, "accuracy": 0.5}),
             json.dumps({"step": 100, "split": "train", "loss": 2.0}),
             json.dumps({"step": 100, "split": "valid", "loss": 1.5, "accuracy": 0.25}),
             '{"step": 300, "split": "va']  # torn by a kill
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    records = curves.valid_curve(tmp_path)
    assert [r["step"] for r in records] == [100, 200]
    assert [r["accuracy"] for r in records] == [0.25, 0.5]
    curves.plot({"run": records}, "test", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        curves.valid_curve(tmp_path / "missing")
