"""Tiny config for tests and smoke runs: a 2-layer d_model-32 model on a small MQAR set (seconds).

    python -m experiments.train --config=experiments/configs/tiny.py:bmojo --workdir=/tmp/tiny
"""

from bmojo_jax.training import default_config


def get_config(preset: str = "bmojo"):
    config = default_config(preset)
    config.model.update(d_model=32, n_layers=2, n_heads=2, window=16, chunk_size=16, d_state=8,
                        ssm_head_dim=16)
    if preset == "bmojo":
        config.model.update(eidetic_per_chunk=2, eidetic_slots=4)
    config.data.update(name="mqar", seq_len=32, num_train=256, num_eval=16)
    config.data.task = dict(vocab_size=64, num_kv_pairs=4)
    config.optimizer.update(lr=1e-2, warmup_steps=2)
    config.update(num_steps=20, batch_size=8, eval_every=10, eval_batches=1, checkpoint_every=10,
                  max_to_keep=3, log_every=5)
    return config
