"""Penn Treebank, word level (Mikolov split, 10k words): the `make run` job.

Sized to train in about 5 minutes on 2 CPU cores (see results/ or the PR for measured numbers).
The argument picks the model preset; every preset gets the same sizes, for fair comparisons:

    python -m experiments.train --config=experiments/configs/ptb.py:bmojo \\
        --workdir=workdir/ptb_bmojo
    python -m experiments.train --config=experiments/configs/ptb.py:transformer \\
        --workdir=workdir/ptb_transformer --config.num_steps=2000

External anchor (docs/design.md section 6): Zaremba et al. 2014 LSTM test perplexity, small 114.5.
"""

from bmojo_jax.training import default_config


def get_config(preset: str = "bmojo"):
    config = default_config(preset)
    # innovation_loss_weight 0.001 (preset 0.01): with 0.01 the validation perplexity at step 300
    # of a 700-step run was 6% worse (285 vs 268); the predictor's own parameters learn at the
    # same rate either way (Adam is invariant to the loss scale), only the pull on the shared
    # fading path shrinks.
    config.model.update(d_model=128, n_layers=2, n_heads=4, window=32, innovation_loss_weight=0.001)
    config.data.update(name="ptb", seq_len=128)
    config.optimizer.update(lr=4e-3, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.1)
    config.update(num_steps=1600, batch_size=8, eval_every=200, eval_batches=10, eval_batch_size=16,
                  checkpoint_every=200, max_to_keep=3, log_every=20)
    config.sample.update(prompt="the company said", max_new_tokens=30, temperature=0.8, top_k=40)
    return config
