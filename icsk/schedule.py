"""Step schedules: which training steps a recorder or metric runs on (Cockpit-style)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Schedule:
    """A rule ``step -> bool``. Build with :meth:`every`, :meth:`at`, :meth:`log` or :meth:`parse`."""

    kind: str = "every"
    n: int = 1
    start: int = 0
    stop: int | None = None
    steps: frozenset[int] = field(default_factory=frozenset)
    per_decade: int = 10

    @classmethod
    def every(cls, n: int = 1, start: int = 0, stop: int | None = None) -> Schedule:
        """Every ``n``-th step from ``start`` (inclusive) up to ``stop`` (exclusive)."""
        if int(n) < 1:
            raise ValueError(f"Schedule.every needs n >= 1, got {n}")
        return cls(kind="every", n=int(n), start=int(start), stop=stop)

    @classmethod
    def at(cls, steps: Iterable[int]) -> Schedule:
        """Exactly the listed steps."""
        steps = list(steps)
        if any(int(x) != x for x in steps):
            raise ValueError(f"Schedule.at: steps must be whole numbers, got {steps}")
        s = frozenset(int(x) for x in steps)
        if any(x < 0 for x in s):
            raise ValueError("Schedule.at: steps must be >= 0")
        return cls(kind="at", steps=s)

    @classmethod
    def log(cls, per_decade: int = 10, start: int = 0, stop: int | None = None) -> Schedule:
        """Log-spaced steps: 0 and round(10**(i/per_decade)) for i = 0, 1, 2, ... (dense early)."""
        if int(per_decade) < 1:
            raise ValueError(f"Schedule.log needs per_decade >= 1, got {per_decade}")
        return cls(kind="log", per_decade=int(per_decade), start=int(start), stop=stop)

    @classmethod
    def parse(cls, spec: Schedule | int | str | Iterable[int] | None) -> Schedule:
        """Accept ``None`` (every step), an int N (every N), a list of steps, ``"every:N"``,
        ``"log:K"`` (K per decade), or a Schedule."""
        if spec is None:
            return cls.every(1)
        if isinstance(spec, Schedule):
            return spec
        if isinstance(spec, bool):
            raise TypeError("schedule must be an int, a list of steps, 'every:N', 'log:K' or a Schedule")
        if isinstance(spec, numbers.Integral):  # int, numpy integers
            return cls.every(int(spec))
        if isinstance(spec, str):
            kind, _, arg = spec.partition(":")
            try:
                if kind == "every":
                    return cls.every(int(arg or 1))
                if kind == "log":
                    return cls.log(int(arg or 10))
            except ValueError as e:
                raise ValueError(f"bad schedule {spec!r}: {e}") from None
            raise ValueError(f"bad schedule {spec!r}: use 'every:N', 'log:K', an int or a list of steps")
        if not isinstance(spec, Iterable):
            raise TypeError(f"schedule must be an int N (every N steps), a list of steps, 'every:N', 'log:K' "
                            f"or a Schedule; got {spec!r} ({type(spec).__name__})")
        return cls.at(spec)

    def __call__(self, step: int) -> bool:
        if self.kind == "at":
            return step in self.steps
        if step < self.start or (self.stop is not None and step >= self.stop):
            return False
        if self.kind == "every":
            return (step - self.start) % self.n == 0
        s = step - self.start
        if s == 0:
            return True
        i = math.ceil(self.per_decade * math.log10(s) - 1e-9)
        # the smallest grid point >= s is round(10**(i/k)); s is scheduled when it hits one exactly
        for j in (i - 1, i, i + 1):
            if j >= 0 and round(10 ** (j / self.per_decade)) == s:
                return True
        return False

    def steps_until(self, last: int) -> list[int]:
        """All scheduled steps in [0, last)."""
        return [s for s in range(last) if self(s)]
