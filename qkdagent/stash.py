"""A typed per-agent store for state several components of one plugin share (DESIGN v2 §3).

    SOCKET: StashKey[DeviceSocket] = StashKey("wireguard.socket")
    shared = self.context.stash.setdefault(SOCKET, DeviceSocket)

Modelled on pytest's `Stash`: keys are objects, not strings, so two plugins cannot collide and
a value's type is known from its key. One stash per agent (never a module global), so two agents
in one process (tests, the demo) share nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

T = TypeVar("T")


class StashKey(Generic[T]):
    """A key for values of type `T`; create one per kind of shared state, at module level."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name
        """For reprs and error messages only; identity is the object itself."""

    def __repr__(self) -> str:
        return f"StashKey({self.name!r})"


class Stash:
    """The agent's stash; reached as `context.stash` from every component."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[StashKey[Any], object] = {}

    def __getitem__(self, key: StashKey[T]) -> T:
        return cast(T, self._values[key])

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._values[key] = value

    def __delitem__(self, key: StashKey[T]) -> None:
        del self._values[key]

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key: StashKey[T], default: T | None = None) -> T | None:
        return cast("T | None", self._values.get(key, default))

    def setdefault(self, key: StashKey[T], factory: Callable[[], T]) -> T:
        """The value under `key`, created by `factory()` on first use."""
        if key not in self._values:
            self._values[key] = factory()
        return cast(T, self._values[key])

    def __repr__(self) -> str:
        return f"<Stash of {len(self._values)} values>"
