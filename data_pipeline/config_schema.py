"""The one way a config section is declared and validated: a frozen dataclass whose fields are
checked by their type hints, with `constrained(...)` for a value check and `check()` for checks
across fields.

    @dataclass(frozen=True)
    class TrainingSection(ConfigSection):
        steps: int = constrained(1000, "int > 0", lambda v: v > 0)
        loader: Literal["auto", "dali", "torch"] = "auto"

    build(TrainingSection, {"steps": -3}, "training")
        -> InvalidConfig: training.steps: expected int > 0, got -3

`build` turns parsed JSON into the dataclass: unknown keys, wrong types, failed constraints and
missing required fields are one-line errors naming the dotted key (lists are converted to tuples
where the hint says tuple, ints to floats where it says float). Constraints are also enforced when
a section is constructed in code (`ConfigSection.__post_init__`), so no instance holds a value its
declaration forbids. `to_jsonable` is the inverse: the resolved section as JSON values.

It lives in data_pipeline because data_pipeline is the lowest layer that has a config section (the
`data` and `augment` sections) and may not import engine; engine's sections use it from here.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import MISSING, field
from typing import Any, Callable, Literal

REQUIRED: Any = MISSING   # `constrained(REQUIRED, ...)`: a field the JSON must give


class InvalidConfig(ValueError):
    """`<dotted key>: <problem>`, one line."""

    def __init__(self, key: str, problem: str) -> None:
        self.key, self.problem = key, problem
        super().__init__(f"{key}: {problem}")


class FieldError(ValueError):
    """A section's own complaint: `field` is the key (relative to the section) to blame. Raised
    at construction; `build` re-raises it as InvalidConfig under the section's dotted key."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(field_name, problem)
        self.field, self.problem, self.section = field_name, problem, ""

    def __str__(self) -> str:
        return f"{self.section + '.' if self.section else ''}{self.field}: {self.problem}"


def constrained(default: Any, expects: str, ok: Callable[[Any], bool], **kwargs) -> Any:
    """A dataclass field whose value (when not None) must satisfy `ok`; `expects` reads like `int > 0`."""
    metadata = {"check": (expects, ok)}
    if default is REQUIRED:
        return field(metadata=metadata, **kwargs)
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


class ConfigSection:
    """Base of every config dataclass: enforces the `constrained` checks and the `Literal` choices
    of its fields, then `check()`. `SECTION` names the section in errors of an instance made in code."""
    SECTION = ""

    def __post_init__(self) -> None:
        try:
            self._check_fields()
            self.check()
        except FieldError as exc:
            exc.section = self.SECTION
            raise

    def _check_fields(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            choices = _literal_choices(hints[f.name])
            if choices is not None and value not in choices:
                raise FieldError(f.name, f"expected {_type_name(hints[f.name])}, got {_got(value)}")
            check = f.metadata.get("check")
            if check is not None and not check[1](value):
                raise FieldError(f.name, f"expected {check[0]}, got {_got(value)}")

    def check(self) -> None:
        """Checks across fields; raise FieldError(field, problem)."""


# ----------------------------------------------------------------------------- JSON -> dataclass

def build(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate dataclass `cls` from a JSON object, checking keys, types and constraints;
    errors are InvalidConfig naming `prefix.key`."""
    if not isinstance(raw, dict):
        raise InvalidConfig(prefix or "(top level)", f"expected an object, got {_got(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in raw:
        if name not in fields:
            raise InvalidConfig(_join(prefix, name), f"unknown key (expected one of: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        key, check = _join(prefix, name), f.metadata.get("check")
        if name not in raw:
            if f.default is MISSING and f.default_factory is MISSING:
                if dataclasses.is_dataclass(hints[name]):   # name the first key it misses
                    kwargs[name] = build(hints[name], {}, key)
                    continue
                raise InvalidConfig(key, f"missing (expected {check[0] if check else _type_name(hints[name])})")
            continue
        value = _convert(raw[name], hints[name], key)
        if check is not None and value is not None and not check[1](value):
            raise InvalidConfig(key, f"expected {check[0]}, got {_got(raw[name])}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except FieldError as exc:
        raise InvalidConfig(_join(prefix, exc.field), exc.problem) from None


def _literal_choices(tp: Any) -> tuple | None:
    """The allowed values of a `Literal[...]` (or `Literal[...] | None`) hint, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else None
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "any value"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        inner = _type_name(args[0]) if args else "value"
        return f"a list of {inner}" + ("s" if not inner.endswith("s") else "")
    if dataclasses.is_dataclass(tp):
        return "an object"
    return {int: "int", float: "float", str: "string", bool: "bool", dict: "an object"}.get(tp, str(tp))


def _got(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):   # a value set in code rather than read from JSON
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _convert(value: Any, tp: Any, key: str) -> Any:
    """`value` (parsed JSON) as type `tp`, or InvalidConfig naming `key`."""
    fail = InvalidConfig(key, f"expected {_type_name(tp)}, got {_got(value)}")
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise fail
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except InvalidConfig as exc:
                if exc.key != key:   # the problem is inside the value: report it where it is
                    raise
        raise fail
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise fail
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise fail
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise InvalidConfig(key, f"expected {len(args)} values, got {len(value)}")
            items = [_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            inner = args[0] if args else Any
            items = [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise fail
    raise InvalidConfig(key, f"cannot check values of type {tp}")


# ----------------------------------------------------------------------------- dataclass -> JSON

def to_jsonable(obj: Any) -> Any:
    """A (nested) config as JSON values: dataclasses become objects, tuples lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    return obj
