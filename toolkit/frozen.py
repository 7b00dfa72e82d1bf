"""Frozen JSON values: the immutable dicts and lists entities hold, and the packed form.

JSON-like fields (``payload``, ``result``, ``metadata``) are frozen on
construction (dicts become :class:`FrozenDict`, lists become :class:`FrozenList`),
so the object a get returns can be shared with the cache without anyone changing
the cache through it. A job's ``payload`` is stored packed to save memory (see
:func:`pack`): a flat dict of scalars is kept as its values plus one key tuple
shared by every payload with the same keys.
"""

from __future__ import annotations

from typing import Any, NoReturn


class FrozenDict(dict[str, Any]):
    """A ``dict`` that refuses every change; JSON-serialisable as a dict."""

    __slots__ = ()

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("this mapping is a frozen snapshot; copy it with dict(...) to change it")

    __setitem__ = __delitem__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse
    __ior__ = _refuse

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (dict(self),))

    def __copy__(self) -> FrozenDict:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenDict:
        return self


class FrozenList(list[Any]):
    """A ``list`` that refuses every change; compares equal to a plain list."""

    __slots__ = ()

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("this list is a frozen snapshot; copy it with list(...) to change it")

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenList, (list(self),))

    def __copy__(self) -> FrozenList:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenList:
        return self


_EMPTY = FrozenDict()
"""The one empty :class:`FrozenDict` (``freeze({})`` returns it: immutable, so shared)."""


def freeze(value: Any) -> Any:
    """Return ``value`` with every dict and list frozen (JSON values only)."""
    if isinstance(value, FrozenDict | FrozenList):
        return value
    if isinstance(value, dict):
        return FrozenDict({k: freeze(v) for k, v in value.items()}) if value else _EMPTY
    if isinstance(value, list | tuple):
        return FrozenList(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Return a plain, mutable copy of a frozen JSON value."""
    if isinstance(value, dict):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [thaw(v) for v in value]
    return value


SCALARS = frozenset({str, int, float, bool, type(None)})

_SHARED_KEYS: dict[tuple[str, ...], tuple[str, ...]] = {}
_SHARED_KEYS_MAX = 4096
"""At most this many distinct key tuples are shared; dicts with other keys stay dicts."""
_PACK_MAX_KEYS = 32


def pack(value: Any) -> Any:
    """Return the slot form of a JSON field: :func:`freeze`, except that a flat dict of
    scalars with string keys becomes a plain ``(*values, keys)`` tuple whose ``keys`` is one
    tuple shared by every dict with the same keys (``freeze`` never makes a plain tuple)."""
    kind = type(value)
    if kind in SCALARS:
        return value
    if (kind is dict or kind is FrozenDict) and 0 < len(value) <= _PACK_MAX_KEYS \
            and SCALARS.issuperset(map(type, value.values())):
        keys = tuple(value)
        shared = _SHARED_KEYS.get(keys)
        if shared is None and len(_SHARED_KEYS) < _SHARED_KEYS_MAX \
                and all(type(k) is str for k in keys):
            shared = _SHARED_KEYS.setdefault(keys, keys)
        if shared is not None:
            return (*value.values(), shared)
    return freeze(value)


class PackedJSON:
    """The descriptor of a packed JSON field: stores :func:`pack` of the value in the
    field's slot and gives back the frozen value (a packed dict is rebuilt as a new
    :class:`FrozenDict` with the same keys in the same order)."""

    __slots__ = ("_delete", "_get", "_set")

    def __init__(self, slot: Any) -> None:
        self._get, self._set, self._delete = slot.__get__, slot.__set__, slot.__delete__

    def __get__(self, entity: Any, owner: Any = None) -> Any:
        if entity is None:
            return self
        value = self._get(entity)
        if type(value) is tuple:
            return FrozenDict(zip(value[-1], value))  # noqa: B905 (stops before the keys)
        return value

    def __set__(self, entity: Any, value: Any) -> None:
        self._set(entity, pack(value))

    def __delete__(self, entity: Any) -> None:
        self._delete(entity)


def pack_fields(cls: type[Any], *names: str) -> None:
    """Store the JSON fields ``names`` of ``cls`` packed (see :func:`pack`)."""
    for name in names:
        setattr(cls, name, PackedJSON(cls.__dict__[name]))
