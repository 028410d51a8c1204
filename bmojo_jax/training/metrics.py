"""The metrics file of a training workdir, `metrics.jsonl` (`MetricsLog`): one JSON object a line,
{"step", "split", ...}; on resume the lines after the restored step are dropped, so the file
matches an uninterrupted run's.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax


class MetricsLog:
    """JSON lines at `path`. Opening drops the lines whose "step" exceeds `keep_through_step`, and
    any unreadable line (a run killed mid-write). Multi-host: process 0 alone writes."""

    def __init__(self, path, keep_through_step: int):
        self.path = Path(path)
        self.enabled = jax.process_index() == 0
        if self.enabled and self.path.exists():
            def keep(line):
                try:
                    return json.loads(line)["step"] <= keep_through_step
                except (ValueError, KeyError, TypeError):
                    return False
            kept = [line for line in self.path.read_text().splitlines() if keep(line)]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        """Appends `record` (JSON-able, with "step" and "split") as a line; no-op off process 0."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
