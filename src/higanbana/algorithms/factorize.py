"""Factorisation helpers: LoKr's ``factorize`` and BOFT's block-size choice."""

from __future__ import annotations

from ..errors import ConfigError


def factorize(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dim`` into ``(a, b)`` with ``a ≤ b`` and ``a·b = dim`` (docs/design.md §3, LoKr).

    A positive ``factor`` that divides ``dim`` is used as one side. Otherwise ``a`` steps up
    through the divisors of ``dim`` while ``a + dim/a`` keeps decreasing and ``a ≤ factor``
    (``factor = -1``: no bound), which gives the most balanced split within the bound.
    """
    if dim < 1:
        raise ConfigError(f"cannot factorize dimension {dim}")
    if factor > 0 and dim % factor == 0:
        other = dim // factor
        return (min(factor, other), max(factor, other))
    bound = dim if factor <= 0 else factor
    best = 1
    for a in range(2, dim + 1):
        if a > bound:
            break
        if dim % a:
            continue
        if a + dim // a >= best + dim // best:
            break
        best = a
    return best, dim // best


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def boft_dims(out: int) -> list[int]:
    """Every even block size ``b`` for which ``out/b`` is a power of two."""
    return [b for b in range(2, out + 1, 2) if out % b == 0 and is_power_of_two(out // b)]


def boft_block_size(out: int, dim: int) -> int:
    """BOFT's block size for ``out`` channels: the largest valid ``b ≤ dim``, or a clear error."""
    valid = boft_dims(out)
    fitting = [b for b in valid if b <= dim]
    if not fitting:
        hint = ", ".join(map(str, valid)) if valid else "none (out must be an even number times a power of two)"
        raise ConfigError(
            f"boft: no block size ≤ dim={dim} fits {out} channels "
            f"(needs an even b with {out}/b a power of two); dims that work: {hint}"
        )
    return fitting[-1]
