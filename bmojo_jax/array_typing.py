"""Array shapes as types: one notation for the whole library (jaxtyping aliases).

One meaning per letter (dimension names inside the aliases):

    b  batch                              e  head_dim (attention)
    t  time (tokens)                      n  d_state (SSM state size)
    d  d_model                            p  SSM head channels (head_dim of the SSM heads)
    h  heads (attention, or SSM heads)    D  SSM inner channels, expand * d_model (= h * p): the
    w  window (= chunk, tokens)              channels of the Mamba-1 scan (the Mamba paper's D)
    c  chunks = ceil(t / w)               m  eidetic slots
    k  tokens selected per chunk          V  vocab_size

Index letters inside a formula or an einsum (i, j positions, q steps per chunk, ...) are local to
the module that defines them.

The aliases are annotations only (the library runs no runtime shape checks through them); the
argument checks of each op raise ValueError. Dtypes: `Float` is any floating dtype (float32 or
bfloat16 activations; states and losses are float32 as each op documents), `Int` any integer.
Source: the notation is our choice; the alias style follows recurrentgemma's `array_typing`.
"""

from __future__ import annotations

from jaxtyping import Array, Float, Int, Shaped

# Language model.
Tokens = Int[Array, "b t"]
TokenWeights = Shaped[Array, "b t"]  # float weights, or a bool mask
Activations = Float[Array, "b t d"]
Logits = Float[Array, "b t V"]
HeadWeights = Float[Array, "V d"]  # LM head / tied embedding, one row per vocabulary entry
Scalar = Float[Array, ""]

# Attention and eidetic memory.
QKV = Float[Array, "b t h e"]
Scores = Float[Array, "b t"]  # innovation scores
ChunkSelections = Int[Array, "b c k"]  # positions selected per chunk
MemoryPositions = Int[Array, "b c m"]  # eidetic slots per query chunk, -1 = empty

# Selective SSM, Mamba-2 layout (`ops.ssd`): one scalar decay per head.
SSDInputs = Float[Array, "b t h p"]
SSDStepSizes = Float[Array, "b t h"]
SSDDecayRates = Float[Array, "h"]
SSDState = Float[Array, "b h p n"]

# Selective SSM, Mamba-1 layout (`ops.selective_scan`): a decay per channel and state.
ScanInputs = Float[Array, "b t D"]  # x, and the step sizes dt
ScanDecayRates = Float[Array, "D n"]
ScanState = Float[Array, "b D n"]

# Input and output projections B, C of either layout (one group, shared by the heads).
SSMProjections = Float[Array, "b t n"]
