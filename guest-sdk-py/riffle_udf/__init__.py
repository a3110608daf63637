"""Riffle UDFs as plain Python functions.

Decorate an ordinary, type-annotated function with ``@scalar`` (or a dataclass-like state
class with ``@aggregate``), list it in ``export_udfs``, and build the file with
``riffle udf build`` (which runs ``componentize-py``): the result is a WebAssembly component
implementing the same contract (``riffle:udf@0.2.0``) as a Rust module, loaded by the same host
in the same sandbox.

The type rules are the Rust SDK's, spelled in Python annotations:

=========================  =========================
annotation                 SQL / Arrow type
=========================  =========================
``bool``                   BOOLEAN
``Int32`` / ``int``        INT / BIGINT
``Float32`` / ``float``    REAL / DOUBLE
``str``                    VARCHAR (Utf8)
``bytes``                  BYTEA (Binary)
``Timestamp``              TIMESTAMP (microseconds, UTC; an ``int``)
``Date``                   DATE (days since 1970-01-01; an ``int``)
=========================  =========================

- A non-``Optional`` argument that is NULL makes that row's result NULL without calling the
  function; ``Optional[T]`` arguments see NULL as ``None``.
- Results: ``T``, ``Optional[T]`` (may return ``None``), ``Result[T]`` or
  ``Result[Optional[T]]``: a function declared ``Result[...]`` may ``raise RowError(message)``
  for one row, which the host turns into a row error (its policy decides: fail, NULL, or the
  dead-letter output). Any other exception, or ``RowError`` from a function not declared
  ``Result``, fails the whole call, as a panic does in Rust.

Nothing here imports the component bindings at import time, so the functions and state classes
stay plain Python: unit-test them natively with ``python -m unittest``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import traceback
import types as _pytypes
import typing
from itertools import accumulate
from typing import Any, Callable, Generic, List, Optional, Sequence, TypeVar

__all__ = [
    "ABI_VERSION",
    "Date",
    "Float32",
    "Int32",
    "Result",
    "RowError",
    "Timestamp",
    "aggregate",
    "export_udfs",
    "scalar",
]

#: Version of the WIT contract this SDK implements: 2 is ``riffle:udf@0.2.0``.
ABI_VERSION = 2
SDK_VERSION = "riffle-udf-py 0.1.0"


class Timestamp(int):
    """Microseconds since 1970-01-01T00:00:00 UTC (Arrow ``Timestamp(Microsecond)``)."""

    __slots__ = ()
    MICROS_PER_SECOND = 1_000_000

    def seconds(self) -> int:
        """Whole seconds since the epoch (rounded towards negative infinity)."""
        return self // Timestamp.MICROS_PER_SECOND

    def hour_of_day(self) -> int:
        """Hour of the day (0..24) in UTC."""
        return (self.seconds() % 86_400) // 3_600

    def __repr__(self) -> str:
        return f"Timestamp({int(self)})"


class Date(int):
    """A calendar day: days since 1970-01-01 (Arrow ``Date32``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Date({int(self)})"


class Int32(int):
    """Annotation for a 32-bit integer column (``INT``); values are plain ``int``."""

    __slots__ = ()


class Float32(float):
    """Annotation for a 32-bit float column (``REAL``); values are plain ``float``."""

    __slots__ = ()


T = TypeVar("T")


class Result(Generic[T]):
    """Return annotation of a function that may fail for a single row: ``-> Result[str]``.

    Only an annotation: the function returns its value and raises :class:`RowError` for a
    bad row.
    """


class RowError(Exception):
    """A failure for one row (scalars) or one group (an aggregate's ``finish``).

    Only functions annotated ``-> Result[...]`` may raise it; the row's result becomes NULL and
    the host applies the user's row-error policy.
    """


# --- signatures -------------------------------------------------------------------------------

_TYPE_NAMES = {
    bool: "boolean",
    Int32: "int32",
    int: "int64",
    Float32: "float32",
    float: "float64",
    str: "utf8",
    bytes: "binary",
    Timestamp: "timestamp",
    Date: "date",
}


class SignatureError(TypeError):
    """A decorated function or state class uses a type the contract cannot carry."""


@dataclasses.dataclass(frozen=True)
class _Type:
    name: str  # one of _TYPE_NAMES' values
    nullable: bool


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is _pytypes.UnionType:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1 and len(typing.get_args(annotation)) == 2:
            return members[0], True
    return annotation, False


def _column_type(annotation: Any, what: str) -> _Type:
    inner, nullable = _unwrap_optional(annotation)
    name = _TYPE_NAMES.get(inner)
    if name is None:
        supported = ", ".join(t.__name__ for t in _TYPE_NAMES)
        raise SignatureError(f"{what}: unsupported type {annotation!r} (expected one of {supported}, or Optional of one)")
    return _Type(name, nullable)


def _return_type(annotation: Any, what: str) -> tuple[_Type, bool]:
    """The result column type and whether the function is fallible (``Result[...]``)."""
    if annotation is inspect.Signature.empty:
        raise SignatureError(f"{what}: the return type must be annotated")
    fallible = typing.get_origin(annotation) is Result
    if fallible:
        (annotation,) = typing.get_args(annotation)
    return _column_type(annotation, f"{what} return"), fallible


def _hints(obj: Any, what: str) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj)
    except Exception as e:  # a NameError in a string annotation, usually
        raise SignatureError(f"{what}: cannot resolve type annotations: {e}") from e


def _parameters(fn: Callable, what: str, skip_first: bool) -> list[tuple[str, _Type]]:
    hints = _hints(fn, what)
    params = list(inspect.signature(fn).parameters.values())
    if skip_first:
        params = params[1:]
    out = []
    for p in params:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            raise SignatureError(f"{what}: parameter {p.name!r} must be a plain positional parameter")
        if p.name not in hints:
            raise SignatureError(f"{what}: parameter {p.name!r} needs a type annotation")
        out.append((p.name, _column_type(hints[p.name], f"{what} parameter {p.name!r}")))
    return out


@dataclasses.dataclass
class _Scalar:
    fn: Callable
    name: str
    args: list[tuple[str, _Type]]
    returns: _Type
    fallible: bool
    deterministic: bool
    doc: str


@dataclasses.dataclass
class _Aggregate:
    cls: type
    name: str
    args: list[tuple[str, _Type]]
    returns: _Type
    fallible: bool
    state: list[tuple[str, _Type]]
    retractable: bool
    deterministic: bool
    doc: str


def scalar(fn: Optional[Callable] = None, *, name: Optional[str] = None, nondeterministic: bool = False):
    """Marks a plain function as a Riffle scalar UDF; returns the function unchanged.

    ``@scalar(name="sql_name")`` renames it in SQL; ``@scalar(nondeterministic=True)`` declares
    that it may return different results for the same inputs (its module then gets a real clock
    and real randomness).
    """

    def mark(f: Callable) -> Callable:
        what = f"scalar {f.__name__!r}"
        returns, fallible = _return_type(_hints(f, what).get("return", inspect.Signature.empty), what)
        f.__riffle__ = _Scalar(
            fn=f,
            name=name or f.__name__,
            args=_parameters(f, what, skip_first=False),
            returns=returns,
            fallible=fallible,
            deterministic=not nondeterministic,
            doc=inspect.getdoc(f) or "",
        )
        return f

    return mark(fn) if fn is not None else mark


def _snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def aggregate(cls: Optional[type] = None, *, name: Optional[str] = None, nondeterministic: bool = False):
    """Turns a state class into a Riffle aggregate UDF; returns the class (made a dataclass).

    The class's annotated fields are the state's columns, and each needs a default: the
    defaults are the empty state. Methods: ``update(self, a: A, ...)``, ``merge(self, other)``,
    ``finish(self) -> R`` and optionally ``retract(self, a: A, ...)`` (same arguments as
    ``update``), which sliding OVER frames use. Argument and result types follow the scalar
    rules; a ``finish`` declared ``Result[...]`` may raise :class:`RowError` for one group. The
    SQL name is the class name in snake case unless ``name=`` says otherwise.
    """

    def mark(c: type) -> type:
        what = f"aggregate {c.__name__!r}"
        if not dataclasses.is_dataclass(c):
            c = dataclasses.dataclass(c)
        hints = _hints(c, what)
        state = []
        for field in dataclasses.fields(c):
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise SignatureError(f"{what}: state field {field.name!r} needs a default (the empty state)")
            state.append((field.name, _column_type(hints[field.name], f"{what} state field {field.name!r}")))
        if not state:
            raise SignatureError(f"{what}: a state needs at least one field")
        for method in ("update", "merge", "finish"):
            if not callable(getattr(c, method, None)):
                raise SignatureError(f"{what}: missing method {method!r}")
        args = _parameters(c.update, f"{what}.update", skip_first=True)
        retractable = callable(getattr(c, "retract", None))
        if retractable:
            retract_args = _parameters(c.retract, f"{what}.retract", skip_first=True)
            if [t for _, t in retract_args] != [t for _, t in args]:
                raise SignatureError(f"{what}: retract must take the same arguments as update")
        finish = c.finish
        returns, fallible = _return_type(_hints(finish, f"{what}.finish").get("return", inspect.Signature.empty), f"{what}.finish")
        c.__riffle__ = _Aggregate(
            cls=c,
            name=name or _snake_case(c.__name__),
            args=args,
            returns=returns,
            fallible=fallible,
            state=state,
            retractable=retractable,
            deterministic=not nondeterministic,
            doc=inspect.getdoc(c) or "",
        )
        return c

    return mark(cls) if cls is not None else mark


# --- columns ----------------------------------------------------------------------------------


class _BadArguments(Exception):
    """The host passed columns that do not match the signature (a host bug)."""


_VALUE_CASES = {
    "boolean": "Values_Boolean",
    "int32": "Values_Int32",
    "int64": "Values_Int64",
    "float32": "Values_Float32",
    "float64": "Values_Float64",
    "utf8": "Values_Utf8",
    "binary": "Values_Binary",
    "timestamp": "Values_Timestamp",
    "date": "Values_Date",
}


def _decode(column: Any, t: _Type, rows: int) -> list:
    """A column as a list of Python values, ``None`` at NULLs."""
    if column.len != rows:
        raise _BadArguments(f"a column has {column.len} rows, expected {rows}")
    values = column.values
    if type(values).__name__ != _VALUE_CASES[t.name]:
        raise _BadArguments(f"expected a {t.name} column, got {type(values).__name__}")
    buf = values.value
    kind = t.name
    if kind in ("utf8", "binary"):
        offsets, data = buf.offsets, buf.data
        base = offsets[0]
        if kind == "utf8":
            out = [data[offsets[i] - base : offsets[i + 1] - base].decode() for i in range(rows)]
        else:
            out = [bytes(data[offsets[i] - base : offsets[i + 1] - base]) for i in range(rows)]
    elif kind == "boolean":
        out = [bool((buf[i >> 3] >> (i & 7)) & 1) for i in range(rows)]
    elif kind == "timestamp":
        out = list(map(Timestamp, buf))
    elif kind == "date":
        out = list(map(Date, buf))
    else:
        out = list(buf)
    validity = column.validity
    if validity is not None:
        for i in range(rows):
            if not (validity[i >> 3] >> (i & 7)) & 1:
                out[i] = None
    return out


def _pack_bits(flags: Sequence[bool]) -> bytes:
    out = bytearray((len(flags) + 7) // 8)
    for i, flag in enumerate(flags):
        if flag:
            out[i >> 3] |= 1 << (i & 7)
    return bytes(out)


_ZERO = {"boolean": False, "int32": 0, "int64": 0, "float32": 0.0, "float64": 0.0, "utf8": "", "binary": b"", "timestamp": 0, "date": 0}
_PY_TYPES = {
    "boolean": (bool,),
    "int32": (int,),
    "int64": (int,),
    "float32": (float, int),
    "float64": (float, int),
    "utf8": (str,),
    "binary": (bytes, bytearray),
    "timestamp": (int,),
    "date": (int,),
}
_INT_RANGE = {"int32": (-(1 << 31), (1 << 31) - 1), "int64": (-(1 << 63), (1 << 63) - 1), "timestamp": (-(1 << 63), (1 << 63) - 1), "date": (-(1 << 31), (1 << 31) - 1)}


class _BadValue(Exception):
    """A function produced a value its declared type cannot hold."""


def _encode(values: list, t: _Type, what: str) -> Any:
    """A list of Python values (``None`` = NULL) as a contract column."""
    wit = _bindings().types
    kind = t.name
    validity = None
    if None in values:
        validity = _pack_bits([v is not None for v in values])
        zero = _ZERO[kind]
        values = [zero if v is None else v for v in values]
    allowed = _PY_TYPES[kind]
    for v in values:
        if not isinstance(v, allowed) or (isinstance(v, bool) and kind != "boolean"):
            raise _BadValue(f"{what} returned {v!r} ({type(v).__name__}) for a {kind} result")
    bounds = _INT_RANGE.get(kind)
    if bounds is not None and values and (min(values) < bounds[0] or max(values) > bounds[1]):
        raise _BadValue(f"{what} returned a value out of range for {kind}")
    if kind in ("utf8", "binary"):
        encoded = [v.encode() for v in values] if kind == "utf8" else [bytes(v) for v in values]
        offsets = [0, *accumulate(map(len, encoded))]
        if offsets[-1] >= 1 << 31:
            raise _BadValue(f"{what} returned more than 2 GiB of {kind} data in one batch")
        buf = wit.VarLen(offsets=offsets, data=b"".join(encoded))
        case = wit.Values_Utf8(buf) if kind == "utf8" else wit.Values_Binary(buf)
    elif kind == "boolean":
        case = wit.Values_Boolean(_pack_bits(values))
    elif kind in ("float32", "float64"):
        floats = [float(v) for v in values]
        case = wit.Values_Float64(floats) if kind == "float64" else wit.Values_Float32(floats)
    else:
        case = getattr(wit, _VALUE_CASES[kind])([int(v) for v in values])
    return wit.Column(len=len(values), validity=validity, values=case)


# --- calls ------------------------------------------------------------------------------------


def _run_scalar(spec: _Scalar, rows: int, columns: list) -> tuple[list, list]:
    """Results (``None`` at NULL rows) and ``(row, message)`` errors for one batch."""
    if len(columns) != len(spec.args):
        raise _BadArguments(f"expected {len(spec.args)} argument columns, got {len(columns)}")
    strict = [not t.nullable for _, t in spec.args]
    # A function without arguments still produces `rows` values: one empty tuple per row.
    values = [_decode(c, t, rows) for c, (_, t) in zip(columns, spec.args)] if columns else [[()] * rows]
    fn = spec.fn if columns else (lambda _: spec.fn())
    has_nulls = any(c.validity is not None for c in columns)
    if not has_nulls and not spec.fallible:
        out = list(map(fn, *values))
        _check_not_none(spec.returns, out, spec.name)
        return out, []
    out = [None] * rows
    errors: list = []
    for row, args in enumerate(zip(*values)):
        if has_nulls and any(a is None and s for a, s in zip(args, strict)):
            continue
        if spec.fallible:
            try:
                value = fn(*args)
            except RowError as e:
                errors.append((row, str(e)))
                continue
        else:
            value = fn(*args)
        if value is None and not spec.returns.nullable:
            _check_not_none(spec.returns, [value], spec.name)
        out[row] = value
    return out, errors


def _check_not_none(t: _Type, values: list, what: str) -> None:
    """A function whose result is not ``Optional`` must not return ``None``."""
    if not t.nullable and None in values:
        raise _BadValue(f"{what} returned None but its result is not Optional")


def _read_states(spec: _Aggregate, columns: list, groups: int) -> list:
    if not columns:
        return [spec.cls() for _ in range(groups)]
    if len(columns) != len(spec.state):
        raise _BadArguments(f"expected {len(spec.state)} state columns, got {len(columns)}")
    fields = []
    for column, (name, t) in zip(columns, spec.state):
        values = _decode(column, t, groups)
        if not t.nullable and column.validity is not None and None in values:
            raise _BadArguments(f"state column {name!r} is not nullable but holds a NULL")
        fields.append(values)
    return [spec.cls(*row) for row in zip(*fields)]


def _write_states(spec: _Aggregate, states: list) -> list:
    columns = []
    for name, t in spec.state:
        values = [getattr(s, name) for s in states]
        what = f"{spec.name} state field {name!r}"
        _check_not_none(t, values, what)
        columns.append(_encode(values, t, what))
    return columns


def _run_step(spec: _Aggregate, step: str, groups: int, states: list, group_of: list, columns: list) -> list:
    current = _read_states(spec, states, groups)
    if group_of and max(group_of) >= groups:
        raise _BadArguments(f"a row names group {max(group_of)} of {groups}")
    rows = len(group_of)
    if step == "merge":
        for other, group in zip(_read_states(spec, columns, rows), group_of):
            current[group].merge(other)
        return _write_states(spec, current)
    if step == "retract" and not spec.retractable:
        raise _BadArguments(f"{spec.name} has no retract")
    if len(columns) != len(spec.args):
        raise _BadArguments(f"expected {len(spec.args)} argument columns, got {len(columns)}")
    method = spec.cls.update if step == "update" else spec.cls.retract
    if not columns:
        for group in group_of:
            method(current[group])
        return _write_states(spec, current)
    strict = [not t.nullable for _, t in spec.args]
    values = [_decode(c, t, rows) for c, (_, t) in zip(columns, spec.args)]
    has_nulls = any(c.validity is not None for c in columns)
    for group, args in zip(group_of, zip(*values)):
        if has_nulls and any(a is None and s for a, s in zip(args, strict)):
            continue
        method(current[group], *args)
    return _write_states(spec, current)


def _run_finish(spec: _Aggregate, groups: int, states: list) -> tuple[list, list]:
    out: list = [None] * groups
    errors: list = []
    for group, state in enumerate(_read_states(spec, states, groups)):
        if spec.fallible:
            try:
                out[group] = state.finish()
            except RowError as e:
                errors.append((group, str(e)))
                continue
        else:
            out[group] = state.finish()
        _check_not_none(spec.returns, [out[group]], f"{spec.name}.finish")
    return out, errors


# --- the component's exports ------------------------------------------------------------------


class _Bindings:
    """The component bindings componentize-py generates, imported on first use."""

    def __init__(self) -> None:
        from componentize_py_types import Err
        from wit_world.imports import types

        self.types = types
        self.Err = Err


_BINDINGS: Optional[_Bindings] = None


def _bindings() -> _Bindings:
    global _BINDINGS
    if _BINDINGS is None:
        _BINDINGS = _Bindings()
    return _BINDINGS


def _data_type(t: _Type) -> Any:
    return getattr(_bindings().types.DataType, t.name.upper())


def _arg_infos(args: list) -> list:
    wit = _bindings().types
    return [wit.ArgInfo(name=n, data_type=_data_type(t), nullable=t.nullable) for n, t in args]


def _failure(what: str, error: BaseException) -> Exception:
    """A call error carrying the Python traceback, for a function that raised."""
    b = _bindings()
    detail = "".join(traceback.format_exception(error)).rstrip()
    return b.Err(b.types.CallError_Failed(f"{what} raised {type(error).__name__}: {error}\n{detail}"))


def _output(b: _Bindings, values: list, errors: list, t: _Type, what: str) -> Any:
    column = _encode(values, t, what)
    return b.types.CallOutput(column=column, row_errors=[b.types.RowError(row=r, message=m) for r, m in errors])


def export_udfs(*items: Any, init: Optional[Callable[[bytes], None]] = None) -> type:
    """The component's export class for the listed scalars and aggregate classes.

    Assign it to ``WitWorld`` at the top of the module ``componentize-py`` builds
    (``WitWorld = export_udfs(f, g, MyAggregate, init=configure)``). The order is the order
    ``riffle udf inspect`` shows. ``init``, if given, runs once per instance with the
    configuration bytes the host was given; raising an exception (its message is reported)
    refuses the configuration.
    """
    if not items:
        raise SignatureError("export_udfs needs at least one @scalar function or @aggregate class")
    scalars: list[_Scalar] = []
    aggregates: list[_Aggregate] = []
    for item in items:
        spec = getattr(item, "__riffle__", None)
        if isinstance(spec, _Scalar):
            scalars.append(spec)
        elif isinstance(spec, _Aggregate):
            aggregates.append(spec)
        else:
            raise SignatureError(f"{item!r} is neither a @scalar function nor an @aggregate class")
    names = [s.name for s in scalars] + [a.name for a in aggregates]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SignatureError(f"functions exported twice: {', '.join(duplicates)}")

    class WitWorld:
        def describe(self) -> Any:
            wit = _bindings().types
            return wit.ModuleInfo(
                abi_version=ABI_VERSION,
                sdk=SDK_VERSION,
                functions=[
                    wit.FunctionInfo(
                        name=s.name,
                        args=_arg_infos(s.args),
                        returns=_data_type(s.returns),
                        returns_null=s.returns.nullable,
                        fallible=s.fallible,
                        deterministic=s.deterministic,
                        doc=s.doc,
                    )
                    for s in scalars
                ],
                has_init=init is not None,
            )

        def init(self, config: bytes) -> None:
            if init is None:
                return
            try:
                init(bytes(config))
            except Exception as e:
                raise _bindings().Err(str(e) or type(e).__name__) from None

        def call(self, function: int, rows: int, args: List[Any]) -> Any:
            b = _bindings()
            if function >= len(scalars):
                raise b.Err(b.types.CallError_NoSuchFunction(function))
            spec = scalars[function]
            try:
                values, errors = _run_scalar(spec, rows, args)
                return _output(b, values, errors, spec.returns, spec.name)
            except _BadArguments as e:
                raise b.Err(b.types.CallError_BadArguments(str(e))) from None
            except Exception as e:
                raise _failure(spec.name, e) from None

        def describe_aggregates(self) -> List[Any]:
            wit = _bindings().types
            return [
                wit.AggregateInfo(
                    name=a.name,
                    args=_arg_infos(a.args),
                    returns=_data_type(a.returns),
                    returns_null=a.returns.nullable,
                    fallible=a.fallible,
                    state=[wit.StateField(name=n, data_type=_data_type(t), nullable=t.nullable) for n, t in a.state],
                    retractable=a.retractable,
                    deterministic=a.deterministic,
                    doc=a.doc,
                )
                for a in aggregates
            ]

        def aggregate(self, function: int, step: Any, groups: int, states: List[Any], group_of: List[int], args: List[Any]) -> List[Any]:
            b = _bindings()
            if function >= len(aggregates):
                raise b.Err(b.types.CallError_NoSuchFunction(function))
            spec = aggregates[function]
            try:
                return _run_step(spec, step.name.lower(), groups, states, group_of, args)
            except _BadArguments as e:
                raise b.Err(b.types.CallError_BadArguments(str(e))) from None
            except Exception as e:
                raise _failure(f"{spec.name}.{step.name.lower()}", e) from None

        def finish(self, function: int, groups: int, states: List[Any]) -> Any:
            b = _bindings()
            if function >= len(aggregates):
                raise b.Err(b.types.CallError_NoSuchFunction(function))
            spec = aggregates[function]
            try:
                values, errors = _run_finish(spec, groups, states)
                return _output(b, values, errors, spec.returns, f"{spec.name}.finish")
            except _BadArguments as e:
                raise b.Err(b.types.CallError_BadArguments(str(e))) from None
            except Exception as e:
                raise _failure(f"{spec.name}.finish", e) from None

    return WitWorld
