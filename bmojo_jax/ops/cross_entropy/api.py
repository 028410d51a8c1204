"""Cross-entropy of a linear LM head, without materialising the logits.

Notation (`bmojo_jax.array_typing`): b batch, t time, d d_model, V vocabulary.

    loss = sum_bt token_weights[b,t] (logsumexp_v logits[b,t,v] - logits[b,t,targets[b,t]])
    logits = hidden @ head.T                                  (float32 throughout)

The logits of a training step are its largest tensor ([b, t, V] float32: 256 MiB at 8192 tokens and
vocab 8192) and, on CPU, writing and re-reading them costs about as much as the head's matmuls.

Implementations (docs/design.md section 4), one module each:
    reference  `reference`: the logits [b, t, V] in full,
               `optax.softmax_cross_entropy_with_integer_labels`, autodiff: the oracle.
    xla        `xla`: a `lax.scan` over time chunks of about chunk_size tokens with the gradients
               computed in the forward pass ("fused linear cross-entropy"). The same three matmuls
               as the reference's autodiff, 1.1-1.4x faster fwd+bwd on our CPU at 8192 tokens and
               vocab 8192, with 7-10x less compiled memory: O(b q V) instead of O(b t V), q time
               steps per chunk (`python -m benchmarks.cross_entropy`).
There is no `pallas` implementation. This module checks the arguments and casts targets to int32
and token_weights to float32.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from bmojo_jax import array_typing as at
from bmojo_jax.ops import registry
from bmojo_jax.ops.cross_entropy import reference, xla

# Tokens per scan step of the `xla` implementation (our choice: in an ad-hoc sweep at 8192 tokens,
# vocab 8192, 512 and 1024 were equally fast, 256 and 2048 ~7% slower).
DEFAULT_CHUNK = 512

_LINEAR_CROSS_ENTROPY = {
    "reference": reference.linear_cross_entropy,
    "xla": xla.linear_cross_entropy,
}
IMPLEMENTATIONS = tuple(_LINEAR_CROSS_ENTROPY)


def linear_cross_entropy(hidden: at.Activations, head: at.HeadWeights, targets: at.Tokens,
                         token_weights: at.TokenWeights, *, chunk_size: int = DEFAULT_CHUNK,
                         implementation: Optional[str] = None) -> at.Scalar:
    """Weighted sum of the next-token negative log-likelihoods of a linear head (nats).

    Args:
      hidden: [b, t, d] final features (any float dtype; the head is computed in float32, also
        for bfloat16 models).
      head: [V, d] head matrix (the tied embedding, or an untied head's kernel transposed).
      targets: int [b, t] ids in [0, V) wherever `token_weights` is non-zero (not checked here:
        `LanguageModel.cross_entropy` checks them; put any in-range id, e.g. 0, elsewhere).
      token_weights: [b, t] per-token weights (cast to float32), e.g. mask / count for a mean over
        labelled tokens.
      chunk_size: tokens per scan step of the `xla` implementation (see the module docstring).
      implementation: None (the backend's default), or one of IMPLEMENTATIONS: "reference", "xla".

    Returns:
      float32 scalar sum_{b,t} token_weights * nll.

    Raises:
      ValueError: mismatched shapes, chunk_size < 1, or an unavailable implementation.
    """
    b, t, d = hidden.shape
    if head.ndim != 2 or head.shape[1] != d:
        raise ValueError(f"head must be [vocab, {d}] for hidden {hidden.shape}; got {head.shape}.")
    if targets.shape != (b, t) or token_weights.shape != (b, t):
        raise ValueError(f"targets {targets.shape} and token_weights {token_weights.shape} must "
                         f"be {(b, t)} for hidden {hidden.shape}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1.")
    fn = registry.pick("linear_cross_entropy", _LINEAR_CROSS_ENTROPY, implementation)
    return fn(hidden, head, targets.astype(jnp.int32), token_weights.astype(jnp.float32),
              chunk_size)
