"""Array shapes as types: one notation for the whole library (jaxtyping aliases).

One meaning per letter (dimension names inside the aliases):

    b  batch                              e  head_dim (attention)
    t  time (tokens)                      n  d_state (SSM state size)
    d  d_model                            p  SSM head channels (head_dim of the SSM heads)
    h  heads (attention, or SSM heads)    D  SSM inner channels, expand * d_model (= h * p): the
    w  window (= chunk, tokens)              channels of the Mamba-1 scan (the Mamba paper's D)
    c  chunks = ceil(t / w)               m  eidetic slots
    k  tokens selected per chunk          V  vocab_size
    s  keys an attention query may read: P + t (P tokens of key prefix, then the queries' own), or
       the entries of a decode cache

Index letters inside a formula or an einsum (i, j positions, q steps per chunk, ...) are local to
the module that defines them.

The aliases are annotations only (the library runs no runtime shape checks through them); the
argument checks of each op raise ValueError. Dtypes: `Float` is any floating dtype (float32 or
bfloat16 activations; states and losses are float32 as each op documents), `Int` any integer.
Source: the notation is our choice; the alias style follows recurrentgemma's `array_typing`.
"""

from __future__ import annotations

from jaxtyping import Array, ArrayLike, Bool, Float, Int, Shaped

# Language model.
Tokens = Int[Array, "b t"]
TokenWeights = Shaped[Array, "b t"]  # float weights, or a bool mask
Activations = Float[Array, "b t d"]
Logits = Float[Array, "b t V"]
HeadWeights = Float[Array, "V d"]  # LM head / tied embedding, one row per vocabulary entry
Scalar = Float[Array, ""]
IntScalar = Int[Array, ""]  # a count, or a token position (int32)
BatchPositions = Int[Array, "b"]  # one token position per sequence (int32)

# Decoding: one token per sequence.
StepTokens = Int[Array, "b"]
StepFeatures = Float[Array, "b d"]
StepLogits = Float[Array, "b V"]
StepScores = Float[Array, "b"]  # one innovation score per sequence

# Attention and eidetic memory.
QKV = Float[Array, "b t h e"]
Keys = Float[Array, "b s h e"]  # keys or values
KeyMask = Bool[Array, "*b s"]  # True where a key is visible (per sequence, or shared)
KeyBias = Float[Array, "b s"]  # a logit bias per key
ChunkStarts = Int[Array, "b c"]  # the first position of each chunk's document (int32)
SegmentIds = Int[Array, "b s"]  # the document of each token (packed documents; a run of equal ids)
QueryStep = Float[Array, "b h e"]  # one query per sequence (decoding)
RingBuffer = Float[Array, "b w h e"]  # the last w keys or values, slot = position % w
Positions = Int[ArrayLike, "*b t"]  # token positions, shared by the batch or per sequence
AttentionMass = Float[Array, "b t 3"]  # softmax weight on the window, fading and eidetic keys
Scores = Float[Array, "b t"]  # innovation scores
ChunkSelections = Int[Array, "b c k"]  # positions selected per chunk
ChunkScores = Float[Array, "b c k"]  # their scores
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
