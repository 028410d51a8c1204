"""recurrentgemma (PyPI `recurrentgemma[jax]`, Google DeepMind's Griffin / Hawk in Flax linen): one
training step at the peer shapes.

Model: `recurrentgemma.jax.Griffin(GriffinConfig(...), gradient_checkpointing=False)`, width = d_model,
4 heads, lru_width = width, MLP expanded width 3 x width (Griffin's ratio), local-attention window 64
(ours), no logit soft cap, the native (lax.scan) RG-LRU scan that the package picks on CPU. Block
types: --variant=griffin -> (recurrent, attention), Griffin's hybrid cut to 2 layers;
--variant=hawk -> (recurrent, recurrent). Step: forward, next-token cross-entropy, backward, optax
AdamW (same hyper-parameters as ours), one jit with donated parameters and optimizer state.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import recurrentgemma  # noqa: E402
import recurrentgemma.jax as rg  # noqa: E402

import common  # noqa: E402


def main():
    args = common.parse_args()
    variant = args.variant or "griffin"
    second = rg.TemporalBlockType.ATTENTION if variant == "griffin" else rg.TemporalBlockType.RECURRENT
    block_types = (rg.TemporalBlockType.RECURRENT, second) * (args.layers // 2)
    block_types += (rg.TemporalBlockType.RECURRENT,) * (args.layers % 2)
    config = rg.GriffinConfig(vocab_size=args.vocab, width=args.d_model,
                              mlp_expanded_width=3 * args.d_model, num_heads=4,
                              block_types=block_types, embeddings_scale_by_sqrt_dim=True,
                              attention_window_size=64, logits_soft_cap=0.0,
                              lru_width=args.d_model, scan_type=rg.ScanType.LINEAR_NATIVE)
    model = rg.Griffin(config, gradient_checkpointing=False)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (args.batch, args.context + 1), 0,
                                args.vocab, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(args.context), (args.batch, args.context))
    params = model.init(jax.random.PRNGKey(0), tokens[:, :-1], positions)
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))

    def loss_fn(params, tokens):
        logits, _ = model.apply(params, tokens[:, :-1], positions, return_cache=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    step = common.jax_train_step(loss_fn, params, tokens)
    version = getattr(recurrentgemma, "__version__", "1.0.1")
    common.serve(step, dict(params=n_params, package=f"recurrentgemma {version}",
                            jax=jax.__version__, config="blocks=" + "".join(
                                b.name[0] for b in block_types)))


if __name__ == "__main__":
    main()
