"""Multi-query associative recall (Zoology; docs/design.md section 6), small scale for CPU.

Zoology's (L, K) = (128, 8) point with V = 8192 and 2 layers; the memory-budget sweeps of
docs/design.md section 7 vary model.window, model.d_state, model.eidetic_slots on the command line:

    python -m experiments.train --config=experiments/configs/mqar.py:bmojo --workdir=workdir/mqar \\
        --config.model.eidetic_slots=32
"""

from bmojo_jax.training import default_config


def get_config(preset: str = "bmojo"):
    config = default_config(preset)
    config.model.update(d_model=64, n_layers=2, n_heads=2, window=32, d_state=16)
    if preset == "bmojo":
        config.model.update(eidetic_per_chunk=4, eidetic_slots=16)
    config.data.update(name="mqar", seq_len=128, num_train=20_000, num_eval=1_000)
    config.data.task = dict(vocab_size=8192, num_kv_pairs=8)
    config.optimizer.update(lr=3e-3, warmup_steps=100, weight_decay=0.1, b2=0.98)
    config.update(num_steps=3000, batch_size=64, eval_every=500, eval_batches=4,
                  checkpoint_every=500, max_to_keep=2, log_every=50)
    return config
