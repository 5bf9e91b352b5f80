"""Errors raised by higanbana, each naming the file, key, module or option at fault."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class HiganbanaError(Exception):
    """Base class of every error higanbana raises on purpose."""


class UnsupportedLayerError(HiganbanaError, TypeError):
    """The layer cannot be wrapped by the requested algorithm."""


class ConfigError(HiganbanaError, ValueError):
    """An option, rule or config field is invalid."""


def nearest(name: str, candidates: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest candidate, or ''."""
    match = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


class RankClampedWarning(UserWarning):
    """A requested rank exceeded what a layer can use and was clamped (the warning names the modules)."""
