"""mamba2-jax (PyPI `mamba2-jax`, JAX / Flax NNX Mamba-2): one training step at the peer shapes.

Model: `Mamba2ForCausalLM(Mamba2Config(...))`, 2 Mamba-2 blocks (the package's block has no MLP),
d_state 16, head_dim 32, expand 2, conv 4, chunk 64 (our `mamba` preset's values), tied embeddings.
Step: forward, next-token cross-entropy, backward, optax AdamW (same hyper-parameters as ours), one
jit with donated parameters and optimizer state.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import common  # noqa: E402
import mamba2_jax  # noqa: E402


def main():
    args = common.parse_args()
    chunk = int(args.variant or 64)
    cfg = mamba2_jax.Mamba2Config(vocab_size=args.vocab, hidden_size=args.d_model, state_size=16,
                                  head_dim=32, chunk_size=chunk, expand=2, conv_kernel=4,
                                  num_hidden_layers=args.layers, tie_word_embeddings=True)
    model = mamba2_jax.Mamba2ForCausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (args.batch, args.context + 1), 0,
                                args.vocab, jnp.int32)

    def loss_fn(params, tokens):
        logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])["logits"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    step = common.jax_train_step(loss_fn, params, tokens)
    common.serve(step, dict(params=n_params, package="mamba2-jax " + mamba2_jax.__version__,
                            jax=jax.__version__, config=f"chunk_size={chunk}"))


if __name__ == "__main__":
    main()
