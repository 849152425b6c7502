"""LM-Infinite (Han et al., 2023) and the ablations of its Fig. 5: vanilla, a plain window, the Λ-shaped mask
alone, the distance limit alone, and both together.

=================  ====================================  =====================================
policy             keys query i sees                     distance used
=================  ====================================  =====================================
vanilla            all j ≤ i                             i − j
window             i − j < W                             i − j
lambda             j < G or i − j < W                    i − j
distance-limit     all j ≤ i                             min(i − j, L)  (ReRoPE-like)
lm-infinite        j < G or i − j < W                    i − j locally, L for far starting keys
=================  ====================================  =====================================

W (``n_local``) and L (``distance_limit``) default to the pretraining length, G is ``n_global``.
"""

from __future__ import annotations

from .base import EVERY_KEY, Policy


def vanilla() -> Policy:
    """Full causal attention (the model as trained); still routed through the engine so it can be observed."""
    return Policy("vanilla")


def window(n_local: int | None = None) -> Policy:
    """Sliding window of ``n_local`` keys (default: the pretraining length), no starting tokens."""
    return Policy("window", window=n_local, windowed=True)


def lambda_mask(n_global: int = 10, n_local: int | None = None) -> Policy:
    """Λ-shaped mask only: starting tokens plus the window, distances left as they are."""
    return Policy("lambda", window=n_local, n_global=n_global, windowed=True)


def distance_limit(limit: int | None = None) -> Policy:
    """Distance limit only (ReRoPE-like): every key, distances beyond ``limit`` clamped to ``limit``."""
    return Policy(
        "distance-limit", window=limit, n_global=EVERY_KEY, distance_limit=limit, windowed=True, limited=True
    )


def lm_infinite(
    n_global: int = 10,
    n_local: int | None = None,
    distance_limit: int | None = None,
    top_k: int = 0,
    top_k_from_layer: int = 4,
) -> Policy:
    """LM-Infinite: Λ-shaped mask plus distance limit (and optionally top-k middle tokens)."""
    return Policy(
        "lm-infinite",
        window=n_local,
        n_global=n_global,
        distance_limit=distance_limit,
        top_k=top_k,
        top_k_from_layer=top_k_from_layer,
        windowed=True,
        limited=True,
    )
