"""Per-request settings declared once, with their allowed ranges and meanings.

A setting is a dataclass field made by `setting(default, Limits(...), doc)`. The engine checks requests against
those limits (`check_limits`) and the API schemas build their pydantic fields from the same declarations
(ge/gt/le/lt, default, description), so a range is never written twice and the two can never disagree.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import Any

LIMITS, DOC = "limits", "doc"  # the keys of a setting's dataclass field metadata


@dataclass(frozen=True)
class Limits:
    """The allowed range of one number, in pydantic's terms (ge, gt, le, lt); None = unbounded on that side."""

    ge: int | float | None = None
    gt: int | float | None = None
    le: int | float | None = None
    lt: int | float | None = None

    def admits(self, value: int | float) -> bool:
        """Positive comparisons only, so that NaN fails them."""
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def constraints(self) -> dict[str, int | float]:
        """The bounds as keyword arguments of pydantic's `Field`."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def __str__(self) -> str:
        """'in [0, 100]', 'in (0, 1]', '>= 0': the range as an error message states it."""
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        high = ("]", self.le) if self.le is not None else (")", self.lt) if self.lt is not None else None
        if low and high:
            return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
        if low:
            return f"{'>=' if low[0] == '[' else '>'} {low[1]}"
        if high:
            return f"{'<=' if high[0] == ']' else '<'} {high[1]}"
        return "any number"


def setting(default: Any, limits: Limits | None = None, doc: str | None = None) -> Any:
    """A dataclass field carrying its limits and a short meaning (the API's field description)."""
    return dataclasses.field(default=default, metadata={LIMITS: limits, DOC: doc})


def limits_of(cls: type, name: str) -> Limits | None:
    return _field(cls, name).metadata.get(LIMITS)


def doc_of(cls: type, name: str) -> str | None:
    return _field(cls, name).metadata.get(DOC)


def default_of(cls: type, name: str) -> Any:
    return _field(cls, name).default


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """The fields' annotations as types (they are strings under `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def _integral(hint: Any) -> bool:
    return hint is int or (int in typing.get_args(hint) and float not in typing.get_args(hint))


def check_limits(settings: Any) -> None:
    """Raises ValueError naming the first field outside its limits (the message starts with the field's name, which
    the API reports as the error's param)."""
    hints = type_hints(type(settings))
    for f in dataclasses.fields(settings):
        limits: Limits | None = f.metadata.get(LIMITS)
        value = getattr(settings, f.name)
        if limits is None or value is None:
            continue
        if _integral(hints[f.name]) and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"{f.name} must be an integer {limits}, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not limits.admits(value):
            raise ValueError(f"{f.name} must be {limits}, got {value!r}")
