"""The sanity anchors of the far-query MQAR experiments (`experiments/configs/mqar_far.py`), at a
reduced size that trains in about a minute on 2 CPU cores: t = 24 (16 in context), K = 2 pairs,
vocabulary 32, window 4, 2 layers of d_model 32.

  * full attention solves MQAR when every key is in its context (queries right after the pairs);
  * full attention also solves the far-query setting (queries from 4 + 2 windows on), where
  * SWA is near chance (every key is beyond its window);
  * B'MOJO with the oracle selection (the key/value context handed in as eidetic scores) solves
    that far-query setting.

The full-size anchors are in results/mqar_far.md.
"""

import pytest

from bmojo_jax import training
from experiments.configs import mqar_far

pytestmark = pytest.mark.slow

K, W = 2, 4


def _train(tmp_path, arg: str, seq_len: int, query_start: int, num_steps: int) -> dict:
    config = mqar_far.get_config(arg)
    config.model.update(d_model=32, window=W, chunk_size=W, d_state=4, ssm_head_dim=8)
    if arg.startswith("bmojo"):
        config.model.update(eidetic_per_chunk=W, eidetic_slots=2 * K)
    config.data.update(seq_len=seq_len, num_train=20_000, num_eval=256)
    config.data.task = dict(vocab_size=32, num_kv_pairs=K, query_start=query_start)
    config.optimizer.update(lr=3e-3, warmup_steps=50)
    config.update(num_steps=num_steps, eval_every=100, checkpoint_every=100_000, log_every=100,
                  eval_batches=4)
    return training.train_and_evaluate(config, tmp_path / arg)


def test_attention_solves_in_context_mqar(tmp_path):
    result = _train(tmp_path, "transformer", seq_len=16, query_start=2 * K, num_steps=1500)
    assert result["valid"]["accuracy"] >= 0.99, result["valid"]


def test_far_query_attention_solves_swa_near_chance_and_oracle_bmojo_solves_it(tmp_path):
    far = 2 * K + 2 * W  # beyond the window and the fading span of a B layer
    attention = _train(tmp_path, "transformer", seq_len=24, query_start=far, num_steps=1500)
    assert attention["valid"]["accuracy"] >= 0.99, attention["valid"]  # 500 steps at seed 0
    swa = _train(tmp_path, "swa", seq_len=24, query_start=far, num_steps=300)
    assert swa["valid"]["accuracy"] < 0.2, swa["valid"]  # chance 1/32; a context value 1/K
    oracle = _train(tmp_path, "bmojo_oracle", seq_len=24, query_start=far, num_steps=2000)
    assert oracle["valid"]["accuracy"] >= 0.95, oracle["valid"]
