"""Small statistics helpers used by tasks, probes and notebooks."""

from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default).

    Better behaved than the normal approximation near 0 and 1, which is where fine-tuned accuracies sit.

    Examples
    --------
    >>> low, high = wilson_interval(90, 100)
    >>> round(low, 3), round(high, 3)
    (0.826, 0.945)
    """
    if n <= 0:
        raise ValueError(f"The 'n' parameter of wilson_interval must be positive. Got {n!r} instead.")
    if not 0 <= successes <= n:
        raise ValueError(f"'successes' must lie in [0, n={n}]. Got {successes!r} instead.")
    p = successes / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
