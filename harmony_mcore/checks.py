"""The one validation style of every config section: `require(ok, key, message)` -> "key: message".

Shared by the root config tree (harmony_mcore.config) and the labeller's sections (harmony_mcore.labels.config,
which the `label` CLI also uses on its own), so every refused value reads the same way, e.g.
`optim.adam_beta1: must be in [0, 1), got 1.5`.
"""

from __future__ import annotations

import math


class ConfigError(ValueError):
    """A config key or value that cannot be used, naming the key."""


def require(ok: bool, key: str, message: str) -> None:
    """ConfigError("key: message") unless ok."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


def is_finite(value: object) -> bool:
    """A real number that is neither NaN nor infinite (booleans are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
