"""Books: Shakespeare's 42 works and Jane Austen's 6 novels, byte-level BPE (4096), split by
document (docs/design.md section 6). Reports bits per byte besides perplexity.

    python -m experiments.train --config=experiments/configs/books.py:bmojo --workdir=workdir/books
    python -m experiments.evaluate --workdir=workdir/books --split=test --seq_len=1024
"""

from bmojo_jax.training import default_config


def get_config(preset: str = "bmojo"):
    config = default_config(preset)
    config.model.update(d_model=128, n_layers=4, n_heads=4, window=64)
    config.data.update(name="books", seq_len=256, bpe_vocab_size=4096)
    config.optimizer.update(lr=2e-3, warmup_steps=100, weight_decay=0.1)
    config.update(num_steps=3000, batch_size=16, eval_every=250, eval_batches=20,
                  checkpoint_every=250, max_to_keep=3, log_every=25)
    config.sample.update(prompt="It is a truth universally acknowledged", max_new_tokens=60)
    return config
