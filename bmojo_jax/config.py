"""Model configuration: one config space for the whole B'MOJO family (docs/design.md section 3).

A layer pattern string picks the mixer of each layer (repeated to `n_layers`):

    A  full causal attention            (the paper's "Mistral" baseline)
    W  sliding-window attention         (finite eidetic span)
    M  selective SSM                    (fading memory only)
    F  B'MOJO-F: window + fading tokens, one softmax
    B  B'MOJO:   window + fading tokens + innovation-selected eidetic tokens

`ModelConfig.preset(name, **overrides)` builds the six presets of docs/design.md section 3. Every
value is validated on construction; a bad value raises `ValueError` naming the field, the value
and what is allowed.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

MIXER_LETTERS = "AWMFB"
SSM_KINDS = ("mamba2", "mamba1")
IMPLEMENTATIONS = (None, "reference", "xla", "pallas")
SCAN_IMPLEMENTATIONS = IMPLEMENTATIONS + ("associative",)
EVICTIONS = ("fifo", "score")
STORAGE_ENTRIES = ("window", "evicted")
PREDICTORS = ("identity", "linear")
SELECTIONS = ("fading", "state", "threshold", "quantile", "learned", "random", "projection")
# The rules whose scores read the tokens before a token across documents (the "state" rule's
# distances, the gates' running mean and window of scores): they take no packed documents.
CROSS_DOCUMENT_SELECTIONS = ("state", "threshold", "quantile")
DTYPES = ("float32", "bfloat16")
REMATS = ("none", "block", "dots")
DROPOUTS = ("embedding_dropout", "residual_dropout", "attention_dropout")

PRESET_PATTERNS = {
    "transformer": "A",
    "swa": "W",
    "mamba": "M",
    "hybrid": "MMMA",
    "bmojo_f": "F",
    "bmojo": "B",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a `LanguageModel`.

    Sizes are in elements, lengths in tokens. Defaults are small (a CPU-friendly research size).

    Attributes:
      vocab_size: number of token ids; inputs must lie in [0, vocab_size).
      d_model: residual stream width.
      n_layers: number of decoder blocks.
      pattern: mixer letters (see module docstring), repeated cyclically to `n_layers`.
      n_heads: attention heads; head_dim = d_model // n_heads.
      window: sliding-window length W of `W`, `F`, `B` mixers (tokens). Also B'MOJO's chunk size
        (docs/design.md section 2: our choice to tie them).
      d_ff: hidden width of the SwiGLU MLP (None: 8/3 d_model rounded up to a multiple of 8; 0: no
        MLP, the block is its mixer alone, as in Mamba (Gu and Dao 2023) and mamba2-jax).
      ssm_kind: "mamba2" (scalar decay per head, SSD chunked form) or "mamba1" (decay per channel and
        state).
      d_state: SSM state size per channel (n).
      ssm_expand: inner width of the `M` mixer = ssm_expand * d_model.
      fading_expand: inner width of the fading SSM inside `F`/`B` mixers (our choice: 1, so that the
        B'MOJO presets stay close in parameter count to the others).
      ssm_head_dim: Mamba-2 head dimension p (inner width must be divisible by it).
      d_conv: kernel size of the SSM's short causal depthwise convolution.
      chunk_size: chunk length of the chunked SSM scans (tokens).
      tie_fading_kv: fading keys/values use the same K/V projections as the in-context tokens.
      eidetic_per_chunk: k_e, tokens selected per chunk by the innovation test (`B` only; 0 = B'MOJO-F).
      eidetic_slots: M_max, eidetic memory slots; a multiple of eidetic_per_chunk.
      eidetic_lag: chunks between selection and visibility (>= 1; 2 keeps eidetic tokens out of the
        window, docs/design.md section 2).
      eidetic_eviction: "fifo" (keep the newest) or "score" (running top-M by innovation score).
      eidetic_selection: the rule that scores tokens for the eidetic memory (docs/design.md
        section 2; `B` only; our choices): "fading" (innovation against the fading state, the
        paper's test), "state" (innovation against the whole state: the minimum of that and the
        squared distance of X_t to the tokens the state holds verbatim, the window before it and
        the eidetic slots, so a repeated token does not take a slot again; under sequence
        parallelism every shard gathers the whole sequence's tokens for it), "threshold" (the same score, and a token is kept only when it exceeds
        `eidetic_threshold` times the mean score of the tokens before it: HAM's growth rule),
        "quantile" (the same score, and a token is kept only when it exceeds the
        `eidetic_quantile`-quantile of the scores of the `window` tokens before it: a running
        quantile, so that about 1 - eidetic_quantile of the tokens pass whatever the scores'
        scale),
        "learned" (a linear score of X_t, trained by the language-modelling loss through the
        attention logit of the slot that holds the token, + log sigmoid(score)), "random" (a
        control: uniform scores, a function of `eidetic_seed` and the position in the document),
        "projection" (a control that varies with the content yet knows nothing of the task: X_t
        projected on a fixed random direction drawn from `eidetic_seed`, no gradient).
        Any rule is overridden by `eidetic_scores` handed to the model (an oracle).
      eidetic_threshold: the factor of the "threshold" rule (> 0).
      eidetic_quantile: q of the "quantile" rule, in (0, 1).
      eidetic_seed: the seed of the "random" and "projection" rules.
      storage_slots: the in-storage eidetic memory of `B` layers (docs/design.md section 7c; our
        design, the paper gives none): capacity S in tokens of a per-sequence store of the keys
        and values of past tokens; 0 = off. What enters is `storage_entry`.
      storage_entry: "window" (every token, once it is 2 chunks old, for the next S tokens: the
        store is the last S tokens before the window) or "evicted" (only the eidetic selections
        the slots' buffer evicts, from the chunk after their eviction; the store keeps the S
        latest of them, so it reaches back S w / k tokens or more; needs eidetic_slots > 0).
      storage_recall: 1.0 (default), the retrieval's exact top r (`lax.top_k`); in (0, 1), the
        recall target of `lax.approx_max_k`, which is approximate (and faster on large stores)
        on TPU only: there decoding may then retrieve other tokens than the parallel forward.
      storage_topk: r, stored tokens each query chunk retrieves (the top r by the dot product of
        their keys with the previous chunk's mean query, summed over heads), read in the same
        softmax as the window, fading and eidetic keys; 1 <= r <= storage_slots when storage is
        on, else 0.
      innovation_predictor: "identity" or "linear" predictor P of X_t from F_{t-1}.
      innovation_loss_weight: weight of the auxiliary predictor loss ||sg(X_t) - P(F_{t-1})||^2.
      tie_embeddings: the LM head reuses the token embedding matrix.
      rope_base: RoPE base frequency.
      implementation: op implementation for every op (None = best for the backend).
      scan_implementation: override for the SSM scans only (adds "associative"); None = implementation.
      dtype: compute dtype ("float32" or "bfloat16"). "bfloat16" is mixed precision (docs/design.md
        section 3): activations and the matmuls of the linear layers, convolution and embedding in
        bfloat16; parameters (hence gradients and optimizer state), the SSM scans' state and
        accumulation, the attention softmax, norm statistics, innovation scores, the LM head,
        logits and loss in float32.
      embedding_dropout: dropout rate on the token embeddings, in [0, 1) (0 = off).
      residual_dropout: dropout rate on each block's mixer and MLP outputs before their residual
        add, in [0, 1).
      attention_dropout: dropout rate on an attention mixer's read-out (the heads' weighted values,
        before the output projection), in [0, 1). Not on the attention probabilities (our choice:
        the softmax is one fused op with reference, xla and pallas implementations, and the Pallas
        kernels never materialise the probabilities). Dropout is active only when a dropout key
        is handed to `LanguageModel.forward` / `cross_entropy` (training); evaluation, generation,
        prefill and decoding are deterministic.
      remat: rematerialisation of the blocks in the backward pass: "none" (keep every
        activation), "block" (`nnx.remat` per block: keep the block inputs only, recompute the
        rest), "dots" (per block with the `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`
        policy: keep the outputs of the weight matmuls, recompute the rest). Gradients are the
        same; only time and memory differ. Measured on XLA:CPU (jax 0.10.2): no memory saved,
        the compiler schedules every block's recomputation early (docs/design.md section 3).
    """

    vocab_size: int = 8192
    d_model: int = 128
    n_layers: int = 2
    pattern: str = "B"
    n_heads: int = 4
    window: int = 64
    d_ff: Optional[int] = None
    ssm_kind: str = "mamba2"
    d_state: int = 16
    ssm_expand: int = 2
    fading_expand: int = 1
    ssm_head_dim: int = 32
    d_conv: int = 4
    chunk_size: int = 64
    tie_fading_kv: bool = True
    eidetic_per_chunk: int = 4
    eidetic_slots: int = 16
    eidetic_lag: int = 2
    eidetic_eviction: str = "fifo"
    eidetic_selection: str = "fading"
    eidetic_threshold: float = 2.0
    eidetic_quantile: float = 0.5
    eidetic_seed: int = 0
    storage_slots: int = 0
    storage_topk: int = 0
    storage_entry: str = "window"
    storage_recall: float = 1.0
    innovation_predictor: str = "linear"
    innovation_loss_weight: float = 0.01
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    implementation: Optional[str] = None
    scan_implementation: Optional[str] = None
    dtype: str = "float32"
    embedding_dropout: float = 0.0
    residual_dropout: float = 0.0
    attention_dropout: float = 0.0
    remat: str = "none"

    def __post_init__(self):
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "window", "d_state", "ssm_expand",
                    "fading_expand", "ssm_head_dim", "d_conv", "chunk_size", "eidetic_lag")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name}={value!r}: must be an integer >= 1.")
        for name in ("eidetic_per_chunk", "eidetic_slots", "storage_slots", "storage_topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"ModelConfig.{name}={value!r}: must be an integer >= 0.")
        if self.d_ff is not None and (not isinstance(self.d_ff, int) or self.d_ff < 0):
            raise ValueError(f"ModelConfig.d_ff={self.d_ff!r}: must be an integer >= 0 (0: no "
                             "MLP) or None (8/3 d_model).")
        if not self.pattern or any(c not in MIXER_LETTERS for c in self.pattern):
            raise ValueError(f"ModelConfig.pattern={self.pattern!r}: every letter must be one of "
                             f"{' '.join(MIXER_LETTERS)} (A attention, W sliding window, M SSM, "
                             f"F B'MOJO-F, B B'MOJO).")
        if self.d_model % self.n_heads:
            raise ValueError(f"ModelConfig.d_model={self.d_model} is not divisible by "
                             f"n_heads={self.n_heads}.")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head_dim = d_model // n_heads = {self.d_model // self.n_heads} must be "
                             f"even (RoPE rotates pairs of channels).")
        for expand_name in ("ssm_expand", "fading_expand"):
            inner = getattr(self, expand_name) * self.d_model
            if self.ssm_kind == "mamba2" and inner % self.ssm_head_dim:
                raise ValueError(f"ModelConfig.{expand_name} * d_model = {inner} is not divisible by "
                                 f"ssm_head_dim={self.ssm_head_dim}.")
        check_choice("ModelConfig.ssm_kind", self.ssm_kind, SSM_KINDS)
        check_choice("ModelConfig.implementation", self.implementation, IMPLEMENTATIONS)
        check_choice("ModelConfig.scan_implementation", self.scan_implementation,
                     SCAN_IMPLEMENTATIONS)
        check_choice("ModelConfig.eidetic_eviction", self.eidetic_eviction, EVICTIONS)
        check_choice("ModelConfig.eidetic_selection", self.eidetic_selection, SELECTIONS)
        check_choice("ModelConfig.storage_entry", self.storage_entry, STORAGE_ENTRIES)
        if not self.eidetic_threshold > 0 or self.eidetic_threshold == float("inf"):
            raise ValueError(f"ModelConfig.eidetic_threshold={self.eidetic_threshold!r}: must be a "
                             f"finite number > 0.")
        if not 0 < self.eidetic_quantile < 1:  # also rejects NaN
            raise ValueError(f"ModelConfig.eidetic_quantile={self.eidetic_quantile!r}: must be a "
                             f"number in (0, 1).")
        check_choice("ModelConfig.innovation_predictor", self.innovation_predictor, PREDICTORS)
        check_choice("ModelConfig.dtype", self.dtype, DTYPES)
        check_choice("ModelConfig.remat", self.remat, REMATS)
        for name in DROPOUTS:
            value = getattr(self, name)
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not 0 <= value < 1):  # also rejects NaN
                raise ValueError(f"ModelConfig.{name}={value!r}: must be a rate in [0, 1) "
                                 f"(0 = no dropout).")
        if self.eidetic_per_chunk > self.window:
            raise ValueError(f"ModelConfig.eidetic_per_chunk={self.eidetic_per_chunk} exceeds the "
                             f"chunk (window={self.window}) it selects from.")
        if self.eidetic_per_chunk == 0 and self.eidetic_slots:
            raise ValueError(f"ModelConfig.eidetic_slots={self.eidetic_slots} needs "
                             f"eidetic_per_chunk >= 1 (or set eidetic_slots=0).")
        if self.eidetic_per_chunk and self.eidetic_slots < self.eidetic_per_chunk:
            raise ValueError(f"ModelConfig.eidetic_slots={self.eidetic_slots} must be a positive "
                             f"multiple of eidetic_per_chunk={self.eidetic_per_chunk} (or set both "
                             f"to 0: B'MOJO-F).")
        if self.eidetic_per_chunk and self.eidetic_slots % self.eidetic_per_chunk:
            raise ValueError(f"ModelConfig.eidetic_slots={self.eidetic_slots} must be a multiple of "
                             f"eidetic_per_chunk={self.eidetic_per_chunk}.")
        if (self.storage_slots > 0) != (self.storage_topk > 0) or \
                self.storage_topk > self.storage_slots:
            raise ValueError(f"ModelConfig.storage_topk={self.storage_topk}: must be in [1, "
                             f"storage_slots] when storage_slots={self.storage_slots} > 0, and 0 "
                             f"when storage is off.")
        if self.storage_slots and "B" not in self.pattern:
            raise ValueError(f"ModelConfig.storage_slots={self.storage_slots}: the store belongs "
                             f"to `B` layers; pattern {self.pattern!r} has none.")
        recall = self.storage_recall
        if not isinstance(recall, (int, float)) or isinstance(recall, bool) or \
                not 0.0 < recall <= 1.0:
            raise ValueError(f"ModelConfig.storage_recall={recall!r}: must be a number in (0, 1] "
                             f"(1: exact top-k; below 1: lax.approx_max_k's recall target).")
        if self.storage_slots and self.storage_entry == "evicted" and not self.eidetic_slots:
            raise ValueError("ModelConfig.storage_entry='evicted' stores the tokens the eidetic "
                             "slots evict: it needs eidetic_slots > 0 (or storage_entry='window').")
        if self.storage_slots and self.eidetic_selection == "learned":
            raise ValueError("ModelConfig.storage_slots: not with eidetic_selection='learned' "
                             "(its slot bias would also reach stored keys); use another rule.")
        for name, low in (("innovation_loss_weight", 0.0), ("rope_base", 1.0)):
            value = getattr(self, name)
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not low <= value < float("inf")):  # also rejects NaN
                raise ValueError(f"ModelConfig.{name}={value!r}: must be a finite number >= "
                                 f"{low:g}.")

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """Returns the named preset (docs/design.md section 3) with `overrides` applied.

        Args:
          name: one of transformer, swa, mamba, hybrid, bmojo_f, bmojo.
          **overrides: any `ModelConfig` field.

        Raises:
          ValueError: unknown preset name, unknown field, or an invalid value.
        """
        if name not in PRESET_PATTERNS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {', '.join(PRESET_PATTERNS)}.")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"Unknown ModelConfig field(s) {unknown}; valid fields: {sorted(fields)}.")
        values = {"pattern": PRESET_PATTERNS[name]}
        if name == "bmojo_f":
            values.update(eidetic_per_chunk=0, eidetic_slots=0)
        values.update(overrides)
        return cls(**values)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden width: d_ff (0: no MLP), or 8/3 d_model rounded up to a multiple of 8
        (our choice)."""
        return self.d_ff if self.d_ff is not None else -(-8 * self.d_model // 3 // 8) * 8

    @property
    def has_dropout(self) -> bool:
        """Whether any dropout rate is > 0 (then training hands the model a dropout key)."""
        return any(getattr(self, name) > 0 for name in DROPOUTS)

    @property
    def layer_mixers(self) -> str:
        """The mixer letter of each layer: `pattern` repeated to n_layers. A `hybrid` (MMMA) model
        always keeps at least one attention layer: with fewer layers than the pattern, the last layer
        is the pattern's last letter (2 layers -> "MA")."""
        mixers = (self.pattern * self.n_layers)[: self.n_layers]
        if self.n_layers < len(self.pattern) and self.pattern[-1] not in mixers:
            mixers = mixers[:-1] + self.pattern[-1]
        return mixers

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def check_choice(name: str, value, allowed) -> None:
    """Raises ValueError "<name>=<value>: allowed values are <allowed>." unless `value` is in
    `allowed`; `name` is the field's full name (e.g. "ModelConfig.ssm_kind", "config.data.name")."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: allowed values are "
                         f"{', '.join(str(a) for a in allowed)}.")
