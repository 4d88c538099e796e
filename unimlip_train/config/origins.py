"""Where each config key came from, so that every configuration error names the key and the file (or the command
line) that set it. Loading records the origins; validation and the model-side resolution fail through them."""
from __future__ import annotations

from typing import NoReturn


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the key and the file."""


class Origins(dict):
    """Dotted key -> the file (or ``command line``) that set it; a lookup falls back to the nearest parent key's
    origin, and a key nobody set comes from the ``defaults``."""

    def get(self, key, default=None):
        while key:
            if dict.__contains__(self, key):
                return dict.__getitem__(self, key)
            key = key.rpartition(".")[0]
        return default

    def set_within(self, key: str):
        """The origin of ``key`` or, when only keys below it were set, of the first of those; None when nothing
        at or below ``key`` was set."""
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        return next((origin for k, origin in self.items() if k.startswith(key + ".")), None)

    def is_set(self, key: str) -> bool:
        """Whether a file or an override set exactly this key (not a parent mapping of it)."""
        return dict.__contains__(self, key)

    def fail(self, key: str, msg: str, *related: str) -> NoReturn:
        """Raise for ``key``; ``related`` keys of an impossible combination are named with their own origin."""
        others = "".join(f" ('{k}' from {self.get(k, 'defaults')})" for k in related)
        raise ConfigError(f"{self.get(key, 'defaults')}: key '{key}': {msg}{others}")
