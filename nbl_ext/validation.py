"""Argument checks shared by the package: ints, choices and dtypes, with one wording each.

Every check takes the value first, then its name, then the bounds, then ``what`` (the function the
user called, prefixed to the message when given), and returns the value it accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

#: Names :func:`parse_dtype` accepts (lower case, an optional ``torch.`` prefix).
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def _prefix(what: str | None) -> str:
    return f"{what}: " if what else ""


def check_int(value: Any, name: str, minimum: int | None = None, *, what: str | None = None) -> int:
    """An int (not a bool) >= ``minimum``: TypeError for another type, ValueError when too small."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{_prefix(what)}{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{_prefix(what)}{name} must be >= {minimum}, got {value}")
    return value


def check_count(value: Any, name: str, minimum: int = 1, *, what: str | None = None) -> int:
    """A count such as a batch size: an int (not a bool) >= ``minimum``, else ValueError whatever was wrong."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{_prefix(what)}{name} must be {kind}, got {value!r}")
    return value


def check_choice(value: Any, choices: Sequence[Any], name: str, *, what: str | None = None) -> Any:
    """One of ``choices``, else ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{_prefix(what)}{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def parse_dtype(
    dtype: Any, *, what: str | None = None, allow_auto: bool = False, hint: str = "'float32', 'bfloat16', 'float16'"
) -> torch.dtype | str:
    """A floating-point ``torch.dtype`` from a dtype or its name (``"auto"`` kept as is when allowed).

    ``hint``: the choices the error message offers (``or a torch.dtype`` is appended).
    """
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"{_prefix(what)}dtype must be a floating-point dtype, got {dtype}")
        return dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name == "auto" and allow_auto:
            return "auto"
        if name in DTYPE_NAMES:
            return DTYPE_NAMES[name]
    raise ValueError(f"{_prefix(what)}unknown dtype {dtype!r}; use {hint} or a torch.dtype")
