"""The models of the long-context suite (docs/design.md section 7d): every preset at one shape
(2 layers, d_model 128, 4 heads, window 64) and one non-embedding parameter count (the
Transformer's, about 396k: each model's SwiGLU width d_ff is matched, `matched_d_ff`), trained on
Austen at context T = 256 tokens, then evaluated by `experiments.long_context` at 1x to 128x T. A
curriculum, each phase trained until learned: copy rows only (random passages of 8 to 64 tokens,
log-uniform, each repeated at once, `data.copy_max_distance=1`: 45% of the targets are copied
tokens, every one from at most 64 tokens back, inside the window) until half of the held-out copy
rows' copied tokens are predicted (`data.copy_only_until=0.5`, validation every 250 steps), at most
6000 steps (`data.copy_only_steps`); then the mix, per batch of 16, 10 passkey and multi-key
needle prompts followed by their answers (`data.retrieval_fraction`), 2 copy rows
(`data.copy_fraction`) and 4 rows of text, until the held-out retrieval answers stop improving
(`retrieval_accuracy`: less than 2% relative over 4 validations, 1000 steps) or 95% of their
tokens are right, at most 12000 steps in all; a constant learning rate after the warmup, so
that the mix trains at the same rate whenever it starts.

    python -m experiments.train --config=experiments/configs/long_context.py:bmojo \\
        --workdir=workdir/long_context/bmojo
    python -m experiments.long_context --workdir=workdir/long_context/bmojo

The argument is a preset (transformer, swa, mamba, hybrid, bmojo_f, bmojo) or `bmojo_storage`:
bmojo with the in-storage eidetic memory (storage_slots = 16,384, enough for every evaluated
context; storage_topk = 32). B'MOJO's buffer holds 8 eidetic slots, not the preset's 16: at
T = 256 (4 chunks of 64, lag 2, 4 selections per chunk) training fills at most 8, and a model
trained with 16 read the other 8 only past T, with keys older than any it had seen: its
perplexity went from 171 at 1x to 1765 at 2x, while the same model restricted to 8 slots stayed
flat to 16x; the suite's 8-slot model stays flat to 64x (`training.unfilled_eidetic_buffer`
warns of such configs; docs/design.md section 7d).

Our choices: each phase until learned, because a fixed copy phase (3500 of 5500 steps, cosine
schedule: the suite's first recipe) decided run by run whether a model retrieved at all: the
Transformer's copy formed at step ~1750 and a B'MOJO's at ~2200, while another B'MOJO, differing
only in its buffer size (the same function within T), had learned none in 3500 steps, and then
learned no retrieval (held-out 0.20 of answer tokens, against 0.58). The retrieval rows, because
a model of this size trained on text alone never retrieves (B'MOJO scored 0 everywhere after 400
steps of plain text, and a Transformer after 1000 steps with half the rows retrieval prompts still
wrote a fixed number); the copy rows first, because without them the Transformer never learned
to copy from its context within 5000 steps (no induction: held-out answers 51% of tokens, 9%
whole), and copy rows mixed in from the start (a half or three quarters of each batch) did not
teach it either, while copy rows alone did by step 2000; until half the copied tokens are right,
because a copy cut mid-formation is lost in the mix (a B'MOJO cut at 2500 steps copied 28% of a
span of 128, and 7% after 500 steps of the mix); a cap of 6000, above the latest formation seen;
copies at every distance, because rows whose copies all lay beyond the window (passages of 64 to
128 tokens, the first rows) taught the windowed models no copy: SWA in 3500 steps, B'MOJO
(8 slots) in 3500 and in 6000, while the Transformer learned it by ~2000; several short
passages per row, because one per row (10% of the targets copied, 3% inside the window) taught
B'MOJO no copy in 3000 steps either; each repeated at once, because with the distance between
the copies up to 4 passage lengths (27% of the targets copied, 57% of them inside the window, 10%
more than 128 tokens back) neither the Transformer (3500 steps, twice) nor B'MOJO (6000 steps)
learned any copy, while B'MOJO learned the near copy by step 2250 (held-out copy_accuracy 0.99):
the copy phase forms the induction circuit inside the window, and the retrieval rows of the mix
ask for it beyond;
a few copy rows in the mix, because without them the copy of random tokens was forgotten (with
them, the Transformer still copies 96% / 87% / 60% of a span of 128 / 64 / 32 at the end; the
suite's copy test measures it); the mix until retrieval stops improving, where the Transformer's
held-out retrieval reached its plateau within 1000-2000 steps (0.79 of answer tokens, 39% whole);
a learning rate of 3e-3 (with three quarters of the rows retrieval prompts, the Transformer wrote
keys of the right form from step 1000 but, at step 2000 of 2500, predicted only 34% of a
passkey's digits given the ones before: its copy was still being learned); T = 256, the smallest
context that holds a needle prompt (about 200 tokens) with room for filler; 2 layers of d_model
128 and a window of 64, so that at T the needle is mostly beyond SWA's and B'MOJO's window. Every
validation scores 64 held-out retrieval prompts of the validation split teacher-forced
(`retrieval_accuracy`, `retrieval_exact`: the fraction answered exactly) and 64 held-out copy
rows (`copy_accuracy`).
"""

from bmojo_jax import PRESETS, ModelConfig, match_d_ff, param_count
from bmojo_jax.training import default_config, model_config

STORAGE = dict(storage_slots=16_384, storage_topk=32)
BPE_VOCAB_SIZE = 4096


def get_config(arg: str = "bmojo"):
    """The training config (`training.default_config` with the settings above) of one model of
    the suite. Raises ValueError naming `arg` unless it is a preset or "bmojo_storage"."""
    if arg not in (*PRESETS, "bmojo_storage"):
        raise ValueError(f"long_context config {arg!r}: must be a preset ({', '.join(PRESETS)}) "
                         f"or bmojo_storage.")
    preset = "bmojo" if arg == "bmojo_storage" else arg
    config = default_config(preset)
    config.model.update(d_model=128, n_layers=2, n_heads=4, window=64)
    if preset == "bmojo":
        config.model.update(eidetic_slots=8)
    if arg == "bmojo_storage":
        config.model.update(**STORAGE)
    config.model.d_ff = matched_d_ff(config)
    config.data.update(name="austen", seq_len=256, bpe_vocab_size=BPE_VOCAB_SIZE,
                       copy_only_steps=6000, copy_only_until=0.5, copy_max_distance=1,
                       copy_fraction=0.125,
                       retrieval_fraction=0.625)
    config.optimizer.update(lr=3e-3, schedule="constant", warmup_steps=100, weight_decay=0.1)
    config.update(num_steps=12000, batch_size=16, eval_every=250, eval_batches=10,
                  checkpoint_every=500, max_to_keep=2, log_every=50)
    config.early_stop.update(metric="retrieval_accuracy", target=0.95, patience=4,
                             min_delta=0.02)
    config.sample.update(prompt="It is a truth universally acknowledged", max_new_tokens=60)
    return config


def matched_d_ff(config) -> int:
    """The SwiGLU width d_ff at which the model of `config` has the Transformer's non-embedding
    parameter count at the suite's shape (`bmojo_jax.match_d_ff`): the suite compares its models
    at one parameter count."""
    shape = {key: config.model[key] for key in ("d_model", "n_layers", "n_heads", "window")}
    target = param_count(ModelConfig.preset("transformer", **shape, vocab_size=BPE_VOCAB_SIZE),
                         embedding=False)
    return match_d_ff(model_config(config, BPE_VOCAB_SIZE), target).d_ff
