"""Portable seeded randomness: `draw(seed, *key)` is a 64-bit integer decided only by its inputs.

A counter-based hash (BLAKE2b of the repr of the key) instead of a stateful generator: results
do not depend on call order, Python or NumPy versions, or the machine, so generated data and
splits are reproducible anywhere. `unit(seed, *key)` is the same draw scaled into [0, 1).
"""

from __future__ import annotations

import hashlib


def draw(seed: int, *key: object) -> int:
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def unit(seed: int, *key: object) -> float:
    return draw(seed, *key) / 2.0 ** 64
