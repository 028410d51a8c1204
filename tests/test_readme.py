"""The README's ```python blocks run as written.

Each block runs in a fresh namespace (a reader copies one block, not the page), from a temporary
directory that holds what the blocks name: a finished tiny training run at `workdir/ptb_bmojo`
(trained on the test corpus tests/data/tiny_corpus, built only when a block names it). A block
right after a line `<!-- not-tested -->` is skipped: only for what CI cannot run (several hosts).
"""

import re
from pathlib import Path

import pytest

from bmojo_jax import training

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- not-tested -->[ \t]*\n)?```python\n(.*?)^```", re.S | re.M)
WORKDIR = "workdir/ptb_bmojo"


def _blocks():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start(2)) + 1
        skip = [pytest.mark.skip(reason="marked <!-- not-tested --> in README.md")] if (
            match.group(1)) else []
        blocks.append(pytest.param(match.group(2), line, id=f"README.md:{line}", marks=skip))
    return blocks


def test_readme_has_python_blocks():
    assert len(_blocks()) >= 4  # the extraction works (a broken pattern would test nothing)


@pytest.fixture(scope="module")
def readme_dir(tmp_path_factory):
    """The directory the blocks run from."""
    return tmp_path_factory.mktemp("readme")


@pytest.fixture(scope="module")
def trained_run(readme_dir):
    """A finished tiny run at WORKDIR in readme_dir: 2 steps of a one-layer sliding-window model
    on the test corpus (the cheapest to compile; the blocks only need a run)."""
    config = training.default_config("swa")
    config.model.update(d_model=16, n_layers=1, n_heads=2, window=8, ssm_head_dim=8)
    config.data.update(name="text_files", path=str(ROOT / "tests/data/tiny_corpus"), seq_len=32,
                       bpe_vocab_size=300)
    config.optimizer.warmup_steps = 1
    config.sample.max_new_tokens = 0
    config.update(num_steps=2, batch_size=2, eval_every=2, eval_batches=1, checkpoint_every=2,
                  log_every=1)
    training.train_and_evaluate(config, readme_dir / WORKDIR)
    return readme_dir / WORKDIR


@pytest.mark.slow
@pytest.mark.parametrize("code,line", _blocks())
def test_readme_block_runs(code, line, readme_dir, request, monkeypatch):
    if WORKDIR in code:
        request.getfixturevalue("trained_run")
    monkeypatch.chdir(readme_dir)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": f"readme_{line}"})
