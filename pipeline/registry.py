"""One `Registry` class for every kind of named thing: stages, settings, dataset readers,
backbones, evaluation protocols, CAM methods.

Every registry keeps the same contract, so a user meets one behaviour whatever they
misspell:

* an unknown name is an :class:`~pipeline.errors.InputError` that names the parameter
  it came from and lists the known names;
* registering a name twice is an error (a second definition never silently replaces
  the first);
* names are listed in registration order (the order things were declared in).

```python
BACKBONES = Registry("backbone", param="backbone.name")

@BACKBONES.register("vit_small_patch8_224.dino")
def _vit_s8(weights=None, pretrained=True): ...

BACKBONES.get("vit_small_patch8_224.dino")   # the factory
```
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar, overload

from pipeline.errors import InputError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object, with the project's one contract for unknown and duplicate names.

    Args:
        kind: what is registered, in words ("backbone", "dataset reader", ...).
        param: the params.yaml key that names one (``backbone.name``), quoted in errors.
    """

    def __init__(self, kind: str, param: str = "") -> None:
        self.kind = kind
        self.param = param
        self._entries: dict[str, T] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name: str, obj: T | None = None):  # type: ignore[no-untyped-def]
        """``register(name, obj)`` returns ``obj``; ``register(name)`` is a decorator."""
        def add(value: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = value
            return value

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        """The object registered as ``name``; an InputError listing the known names otherwise."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            pass
        where = f" ({self.param})" if self.param else ""
        close = difflib.get_close_matches(str(name), list(self._entries), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise InputError(None, f"unknown {self.kind} '{name}'{where}{hint}; known: {', '.join(self._entries)}")

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries)"
