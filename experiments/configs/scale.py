"""The paper's size ladder (130M, 370M, 790M, 1.4B parameters) at 2k and 8k context, every preset
at one parameter count per rung (planned on CPU by `python -m benchmarks.scale_plan`:
results/scale_plan.md).

    python -m experiments.train --config=experiments/configs/scale.py:bmojo:370M:2k \\
        --workdir=workdir/scale/bmojo-370M-2k
    python -m benchmarks.scale_plan --configs=bmojo:1.4B:8k,transformer:1.4B:8k

The argument is "PRESET:SIZE:CONTEXT": PRESET one of `bmojo_jax.PRESETS`, SIZE one of `SIZES`,
CONTEXT one of `CONTEXTS` (`arguments()` lists all 48).

How the parameter counts are matched:
  * d_model and n_layers per rung are the GPT-3 ladder (Brown et al. 2020, table 2.1: Small,
    Medium, Large, XL), the one Mamba's scaling experiments use and whose Mamba models are named
    130M, 370M, 790M, 1.4B (Gu & Dao 2023, table 12). Our blocks are transformer-style (a mixer
    and a SwiGLU MLP each, docs/design.md section 3), so every preset has GPT-3's block count
    (Mamba counts two of its MLP-less blocks per transformer layer). Heads: 16 from 350M up, 12 at
    125M (GPT-3's 1.3B has 24 heads of 128 channels, more than d_model: our head_dim is
    d_model // n_heads, so 16 heads of 128; our choice).
  * The vocabulary is GPT-NeoX's, padded to a multiple of 8: 50,280 (as Mamba's models), tied to
    the LM head.
  * Every preset's SwiGLU width d_ff is set by `bmojo_jax.match_d_ff` so that its non-embedding
    parameter count matches the `transformer`'s at the same d_model and n_layers (the
    `transformer`'s d_ff is 8/3 d_model, so its blocks have GPT-3's 12 d_model^2 parameters);
    the embedding is the same for all. The counts land within 0.1% of each other (`SIZES` gives
    d_model and n_layers; `benchmarks.scale_plan` reports the exact counts).

Our choices for the other knobs (the paper does not give them):
  * SSMs: Mamba-2's defaults (Dao & Gu 2024): d_state 128, head dim 64, chunk 256; expand 2 in
    `M` layers, 1 in the fading SSM of `F`/`B` layers (the presets' default).
  * `W`/`F`/`B` layers: window (= B'MOJO's chunk) 512 tokens; `B`: 16 eidetic tokens per chunk,
    256 slots (half a window), fifo eviction, the innovation rule.
  * Mixed precision: bfloat16 activations and matmuls, float32 parameters and optimizer state
    (`ModelConfig.dtype`), as on accelerators.
  * Optimisation: GPT-3's peak learning rate per rung and 0.5M tokens per step (Mamba's ladder:
    batch 256 at 2k, 64 at 8k), AdamW as `default_config`, warmup 1% of the steps; num_steps for
    20 tokens per parameter of the rung's nominal size (Hoffmann et al. 2022).
  * Data: the offline `books` corpus at the rung's context, so that the config runs as it is
    (its 4096-token BPE uses the first ids of the 50,280); for a real run set
    --config.data.name=text_files --config.data.path=... --config.data.bpe_vocab_size=50280.
  * Mesh: data parallelism over every device (`default_config`'s mesh_shape (-1, 1, 1)). An
    FSDP mesh (1, -1, 1) splits the parameters and AdamW state, but with today's sharding rules
    XLA's propagation leaves much of the activations unsplit by batch (more memory per device
    than data parallelism, seen with `benchmarks.scale_plan` while choosing the mesh; the committed
    table has data parallelism only), so it is not the default here.
"""

from __future__ import annotations

import functools

import bmojo_jax as bj
from bmojo_jax.training import default_config

# rung -> (d_model, n_layers, n_heads, peak learning rate) (GPT-3 table 2.1; see module docstring)
SIZES = {
    "130M": (768, 12, 12, 6e-4),
    "370M": (1024, 24, 16, 3e-4),
    "790M": (1536, 24, 16, 2.5e-4),
    "1.4B": (2048, 24, 16, 2e-4),
}
NOMINAL_PARAMETERS = {"130M": 130_000_000, "370M": 370_000_000, "790M": 790_000_000,
                      "1.4B": 1_400_000_000}
CONTEXTS = {"2k": 2048, "8k": 8192}
MATCH_LAYERS = 4  # depth at which d_ff is matched (`matched_d_ff`)
VOCAB_SIZE = 50280
TOKENS_PER_STEP = 2 ** 19  # 0.5M tokens (Mamba's ladder)
TOKENS_PER_PARAMETER = 20  # compute-optimal (Hoffmann et al. 2022)
SCALE_MODEL = dict(vocab_size=VOCAB_SIZE, d_state=128, ssm_head_dim=64, chunk_size=256,
                   window=512, dtype="bfloat16")
EIDETIC = dict(eidetic_per_chunk=16, eidetic_slots=256)


def arguments() -> list[str]:
    """Every "PRESET:SIZE:CONTEXT" argument of `get_config`, preset-major."""
    return [f"{preset}:{size}:{context}" for preset in bj.PRESETS for size in SIZES
            for context in CONTEXTS]


def parse(arg: str) -> tuple[str, str, str]:
    """"PRESET:SIZE:CONTEXT" -> (preset, size, context).

    Raises:
      ValueError: not three fields, or a field outside `bj.PRESETS`, `SIZES`, `CONTEXTS`.
    """
    fields = arg.split(":")
    allowed = (bj.PRESETS, tuple(SIZES), tuple(CONTEXTS))
    if len(fields) != 3 or any(f not in a for f, a in zip(fields, allowed)):
        raise ValueError(f"scale config {arg!r}: must be PRESET:SIZE:CONTEXT with PRESET one of "
                         f"{', '.join(bj.PRESETS)}; SIZE one of {', '.join(SIZES)}; CONTEXT one "
                         f"of {', '.join(CONTEXTS)}.")
    return fields[0], fields[1], fields[2]


@functools.lru_cache(maxsize=None)
def matched_d_ff(preset: str, size: str) -> int:
    """The d_ff that gives `preset` the `transformer`'s non-embedding parameter count at `size`
    (`bj.match_d_ff`; abstract models only, nothing is allocated).

    Matched at `MATCH_LAYERS` layers: every rung's depth is a multiple of it, and of every
    preset's pattern, so the non-embedding count at depth L is (L / MATCH_LAYERS) x (the count
    at MATCH_LAYERS, less the final norm) + the final norm for the preset and the target alike,
    and the d_ff closest to the target is the same at both depths (6x fewer layers to build).
    """
    d_model, n_layers, n_heads, _ = SIZES[size]
    assert n_layers % MATCH_LAYERS == 0, (size, n_layers)
    shape = dict(SCALE_MODEL, d_model=d_model, n_layers=MATCH_LAYERS, n_heads=n_heads)
    target = bj.param_count(bj.ModelConfig.preset("transformer", **shape), embedding=False)
    extra = EIDETIC if preset == "bmojo" else {}
    return bj.match_d_ff(bj.ModelConfig.preset(preset, **shape, **extra), target).hidden_dim


def get_config(arg: str = "bmojo:130M:2k"):
    """The training config of "PRESET:SIZE:CONTEXT" (see module docstring).

    Raises:
      ValueError: a malformed argument (`parse`).
    """
    preset, size, context = parse(arg)
    d_model, n_layers, n_heads, lr = SIZES[size]
    seq_len = CONTEXTS[context]
    config = default_config(preset)
    config.model.update(SCALE_MODEL, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                        d_ff=matched_d_ff(preset, size))
    if preset == "bmojo":
        config.model.update(EIDETIC)
    config.data.update(name="books", seq_len=seq_len)
    num_steps = -(-TOKENS_PER_PARAMETER * NOMINAL_PARAMETERS[size] // TOKENS_PER_STEP)
    config.optimizer.update(lr=lr, warmup_steps=max(num_steps // 100, 1), weight_decay=0.1)
    config.update(num_steps=num_steps, batch_size=TOKENS_PER_STEP // seq_len, eval_every=1000,
                  eval_batches=20, checkpoint_every=1000, max_to_keep=2, log_every=50)
    config.sample.update(prompt="It is a truth universally acknowledged", max_new_tokens=60)
    return config
