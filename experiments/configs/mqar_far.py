"""Far-query MQAR at competence (docs/design.md section 7b): every query is asked after every
key/value pair has left the window and the fading span of a `B` layer, so only full attention,
a fading state or the eidetic memory can answer.

    python -m experiments.train --config=experiments/configs/mqar_far.py:transformer \\
        --workdir=workdir/mqar_far/transformer --config.optimizer.lr=3e-3

The argument is a preset (transformer, swa, mamba, hybrid, bmojo_f, bmojo) or a B'MOJO variant
`bmojo_<rule>` with rule one of the `ModelConfig.eidetic_selection` rules (fading, state, threshold,
quantile, learned, random, projection) or `oracle` (`config.eidetic_oracle='context'`).

Sizes (our choice: the smallest at which the families separate and 2 CPU cores train a point in
minutes): t = 64 tokens, K = 4 pairs (context [0, 8)), vocabulary 128, queries from position 24 =
8 + 2 window, window 8, 2 layers of d_model 64. The eidetic memory can hold the whole context:
eidetic_per_chunk = window (one chunk holds the context), 8 slots, score eviction (fifo would push
the context out after slots / per_chunk chunks). Training stops at 99% validation accuracy or at
num_steps = 12,000, on 100,000 training examples (Zoology's size). Both from results/mqar_far.md: a
4000-step cap stops even full attention on its 1/K plateau, and on 16,384 examples the models that
do not find the retrieval solution memorise the training set instead.
"""

from bmojo_jax.training import default_config

RULES = ("fading", "state", "threshold", "quantile", "learned", "random", "projection",
         "oracle")


def get_config(arg: str = "bmojo"):
    preset, _, rule = arg.partition("_") if arg.startswith("bmojo_") and arg != "bmojo_f" else (
        arg, "", "")
    if rule and rule not in RULES:
        raise ValueError(f"mqar_far config {arg!r}: the B'MOJO variant must be one of "
                         f"{', '.join('bmojo_' + r for r in RULES)}.")
    config = default_config(preset)
    config.model.update(d_model=64, n_layers=2, n_heads=2, window=8, chunk_size=8, d_state=8,
                        ssm_head_dim=16)
    if preset == "bmojo":
        config.model.update(eidetic_per_chunk=8, eidetic_slots=8, eidetic_eviction="score")
        if rule == "oracle":
            config.eidetic_oracle = "context"
        elif rule:
            config.model.eidetic_selection = rule
    config.data.update(name="mqar", seq_len=64, num_train=100_000, num_eval=512)
    config.data.task = dict(vocab_size=128, num_kv_pairs=4, query_start=24)
    config.optimizer.update(lr=3e-3, warmup_steps=200, weight_decay=0.1, b2=0.98)
    config.early_stop.update(metric="accuracy", target=0.99)
    config.update(num_steps=12_000, batch_size=64, eval_every=200, eval_batches=8,
                  checkpoint_every=200, max_to_keep=2, log_every=100)
    return config
