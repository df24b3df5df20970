"""The one retry schedule: how long to pause before each retry.

Pure (stamina's backoff is too); the loops that retry (update/fetch.py's
download, update/resolve.py's API calls) take their pauses from here and are
given a ``sleep`` so tests run without waiting. A library such as stamina
was considered: the download loop must not count an attempt that made
progress as a failure, which a decorator-style retry cannot express.
"""

from __future__ import annotations

import random


def backoff_delays(
    retries: int, base: float = 0.5, cap: float = 8.0, *, rng: random.Random | None = None
) -> list[float]:
    """The pauses before each of ``retries`` retries: exponential, capped, jittered.

    Delay i lies in [d/2, d] with d = min(cap, base * 2**i) ("equal jitter"): it
    grows, never collapses to zero, and many servers retrying at once spread out.
    Pure for a given ``rng``.
    """
    # Jitter only spreads retries in time; nothing secret depends on it.
    rng = rng or random.Random()  # noqa: S311
    delays = []
    for i in range(retries):
        d = min(cap, base * 2**i)
        delays.append(d / 2 + rng.random() * d / 2)
    return delays
