"""The attention engine: one blockwise attention routine that serves every policy and every observer.

It is registered once with transformers' ``AttentionInterface`` (:mod:`.interface`), so every model family
that calls the attention interface runs through it without a patched model class. For each block of queries
the engine takes the :class:`LayerPlan` of the layer (which keys are visible, and at which distance), splits
those keys into *segments* that a fused kernel can run without an n×n mask, runs each segment
(:mod:`.kernels`) and merges the partial results by log-sum-exp (:mod:`.blockwise`):

    local band, fully visible part   keys (i_last - W, i_first)    plain kernel call, no mask
    local band, diagonal             keys [i_first, i_last]        causal kernel call
    local band, leading triangle     keys (i_first - W, i_last - W] small C×C mask
    far keys (Λ's starting tokens)   keys j < n_global, i - j ≥ W  query re-rotated to the distance limit
    top-k middle keys                per head, the k best          explicit gather (O(n²) selection)

On a GPU a long prefill under a band plan takes the fused path instead (:mod:`.flex`): the whole band in one
FlexAttention call with a block mask, the far keys beside it, merged the same way.

Memory is O(n · block) and never O(n²). Statistics for observers (log-sum-exp, entropy, sink mass and
sampled logit rows) are computed from the same segments in float32: entropy uses ``H = lse - E_p[logit]``,
with ``E_p[logit]`` from oodlens' CPU kernel, or ``scale · <q, Σ_j p_j k_j>`` obtained by attending with the
keys appended to the values, so the full score matrix is never formed.
"""

from ..compiling import fused_attention
from .blockwise import DEFAULT_BLOCK, plain_block
from .interface import ATTENTION_NAME, Binding, bind, binding_of, register, unbind
from .kernels import explicit_logits, fused_kernel_works, run_segment
from .plan import (
    IDENTITY,
    AttentionObserver,
    BlockStats,
    ChunkPlan,
    KeyLayout,
    KeySource,
    LayerPlan,
    PositionMap,
    QueryScale,
    SlotLayout,
    fixed,
)

__all__ = [
    "IDENTITY",
    "ChunkPlan",
    "PositionMap",
    "QueryScale",
    "fixed",
    "ATTENTION_NAME",
    "DEFAULT_BLOCK",
    "plain_block",
    "AttentionObserver",
    "Binding",
    "BlockStats",
    "KeyLayout",
    "KeySource",
    "LayerPlan",
    "SlotLayout",
    "bind",
    "binding_of",
    "explicit_logits",
    "fused_attention",
    "fused_kernel_works",
    "register",
    "run_segment",
    "unbind",
]
