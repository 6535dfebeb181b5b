"""The message schema: typed dataclasses to msgpack and back, validated, no pickle.

Every message that crosses the network is a dataclass registered with
:func:`message` under a short string tag.  The dataclass's field annotations
*are* the schema: :func:`decode` accepts only values of the annotated types,
so a peer can never make this node build an object it did not expect (the
rule "never unrestricted pickle from the network").

Encoding
--------
A message is the msgpack array ``[tag, [field values in field order]]``.  A
field whose value is itself a registered message is encoded the same way,
nested (tagged, so ``object`` fields and subclasses decode unambiguously).
Arrays rather than maps because field names would dominate the size of a
large view (1,000 members), and because the output is deterministic: equal
messages encode to equal bytes (the etcd baseline compares encodings), with
``dict`` fields written in sorted key order for the same reason.

Evolution
---------
Fields are positional, so a new field is *appended* and given a default.  A
message with missing trailing fields decodes with their defaults (an older
peer talking to a newer one); a message with more fields than this version
knows is rejected (a newer peer must not be half-understood).  Renaming a
field is free; reordering or retyping one needs a new tag or protocol version.

Supported annotations: ``int``, ``float`` (ints accepted), ``bool``, ``str``,
``bytes``, ``None``, ``X | None``, ``tuple[T, ...]``, ``tuple[A, B]``,
``dict[str, T]``, a registered message class (or subclass), and ``object`` /
``typing.Any`` meaning "any registered message".  ``bool`` and ``int`` are kept
apart (Python's ``bool`` is an ``int``, the schema's is not).  Decoded arrays
are tuples, so frozen messages stay hashable.  Fields with ``init=False`` and
non-field attributes (``cached_property``) are not encoded.

Hostile input is bounded: msgpack's own limits are set from the input size, the
nesting of messages is limited to :data:`MAX_DEPTH`, and every failure of any
kind is a :class:`SchemaError` that names the tag and the field path.

Performance: each class's codec (one encoder and one decoder closure per
field, specialised by type) is compiled once, on registration or on first use
when annotations name classes defined later.
"""

from __future__ import annotations

import dataclasses
import operator
import types
import typing
from typing import Any, Callable

import msgpack

from chaos_lightning.wire.errors import SchemaError

__all__ = ["message", "encode", "decode", "registered", "tag_of", "MAX_DEPTH"]

#: How deeply registered messages may nest inside one another.  Real messages
#: nest at most 3 levels (Accept > View > Member); 32 leaves room for growth and
#: keeps a hostile chain of ``object`` fields far from Python's recursion limit.
MAX_DEPTH = 32

_Enc = Callable[[Any, int], Any]
_Dec = Callable[[Any, int], Any]


class _Invalid(Exception):
    """Internal: a value does not fit its annotation.  ``path`` grows innermost-first."""

    __slots__ = ("reason", "path")

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.path: list[str] = []

    def describe(self, tag: str | None) -> str:
        where = (tag or "") + "".join(reversed(self.path))
        return f"{where}: {self.reason}" if where else self.reason


def _kind(value: object) -> str:
    """The msgpack-level name of a value's type, for error messages."""
    names = {
        type(None): "nil",
        bool: "bool",
        int: "int",
        float: "float",
        str: "str",
        bytes: "bytes",
        tuple: "array",
        list: "array",
        dict: "map",
    }
    return names.get(type(value), type(value).__name__)


# -- registry -------------------------------------------------------------------------------


class _Codec:
    """The compiled encoder/decoder of one registered class."""

    __slots__ = ("cls", "tag", "names", "encs", "decs", "min_fields", "getter", "positional", "encode", "decode")

    def __init__(self, cls: type, tag: str) -> None:
        self.cls = cls
        self.tag = tag
        try:
            hints = typing.get_type_hints(cls)
        except Exception as exc:  # NameError for a class defined later; compiled again on use
            raise _Unresolved(f"cannot resolve the annotations of {cls.__qualname__}: {exc}") from exc
        fields = [f for f in dataclasses.fields(cls) if f.init]
        self.names = tuple(f.name for f in fields)
        codecs = [_compile(hints[f.name], f"{tag}.{f.name}") for f in fields]
        self.encs = tuple(c[0] for c in codecs)
        self.decs = tuple(c[1] for c in codecs)
        required = [
            i for i, f in enumerate(fields)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        self.min_fields = required[-1] + 1 if required else 0
        # Missing trailing fields decode to their defaults, so a default outside
        # its own annotation would decode into a message that cannot be re-encoded.
        for f, enc in zip(fields, self.encs):
            if f.default is not dataclasses.MISSING:
                try:
                    enc(f.default, 0)
                except _Invalid as exc:
                    raise TypeError(f"{tag}.{f.name}: default {f.default!r} does not fit its annotation: "
                                    f"{exc.reason}") from None
                except TypeError:
                    pass  # names a message class not compiled yet; decode-time checks still apply
        # kw_only fields cannot be passed positionally to __init__.
        self.positional = not any(f.kw_only for f in fields)
        if len(self.names) > 1:
            self.getter = operator.attrgetter(*self.names)
        elif self.names:
            name = self.names[0]
            self.getter = lambda obj: (getattr(obj, name),)
        else:
            self.getter = lambda obj: ()
        self.encode, self.decode = self._generate([_EXACT.get(hints[name]) for name in self.names])

    def _generate(self, exact: list[type | None]) -> tuple[_Enc, _Dec]:
        """Straight-line fast paths for this class, as dataclasses itself does for __init__.

        All exact-type checks of this level are inlined into one condition; if it
        fails, the checked loop reports which field is wrong.  Nested values are
        decoded once either way (``at`` tracks the field being decoded, for the
        error path), so a bad value deep inside costs no re-decoding.  A
        1,000-member view decodes about three times faster than with the loop.
        """
        n = len(self.names)
        ns: dict[str, object] = {
            "cls": self.cls, "tag": self.tag, "MAX_DEPTH": MAX_DEPTH, "_Invalid": _Invalid,
            "names": self.names, "rejected": self._rejected,
            "slow_encode": self._encode_checked, "slow_decode": self._decode_checked,
        }
        for i in range(n):
            ns[f"e{i}"], ns[f"d{i}"], ns[f"T{i}"] = self.encs[i], self.decs[i], exact[i]
        exact_ix = [i for i in range(n) if exact[i] is not None]
        nested_ix = [i for i in range(n) if exact[i] is None]

        lines = ["def encode(obj, depth):"]
        lines += [f"    a{i} = obj.{name}" for i, name in enumerate(self.names)]
        lines.append("    if " + " and ".join(["depth < MAX_DEPTH"] + [f"type(a{i}) is T{i}" for i in exact_ix]) + ":")
        lines.append("        depth += 1")
        if nested_ix:
            lines.append("        try:")
            for i in nested_ix:
                lines += [f"            at = {i}", f"            a{i} = e{i}(a{i}, depth)"]
            lines += ["        except _Invalid as exc:", "            exc.path.append('.' + names[at])", "            raise"]
        lines.append(f"        return [tag, [{', '.join(f'a{i}' for i in range(n))}]]")
        lines.append("    return slow_encode(obj, depth)")

        lines.append("def decode(fields, depth):")
        check = ["type(fields) is tuple", f"len(fields) == {n}"] + [f"type(fields[{i}]) is T{i}" for i in exact_ix]
        lines.append("    if " + " and ".join(check) + ":")
        if nested_ix:
            lines.append("        try:")
            for i in nested_ix:
                lines += [f"            at = {i}", f"            v{i} = d{i}(fields[{i}], depth)"]
            lines += ["        except _Invalid as exc:", "            exc.path.append('.' + names[at])", "            raise"]
        args = [f"fields[{i}]" if exact[i] else f"v{i}" for i in range(n)]
        if not self.positional:
            args = [f"{name}={arg}" for name, arg in zip(self.names, args)]
        lines += [
            "        try:",
            f"            return cls({', '.join(args)})",
            "        except Exception as exc:",
            "            raise rejected(exc) from None",
            "    return slow_decode(fields, depth)",  # wrong count or a plain field of the wrong type
        ]
        exec("\n".join(lines) + "\n", ns)  # noqa: S102 - source built from field names only
        return ns["encode"], ns["decode"]  # type: ignore[return-value]

    def _rejected(self, exc: Exception) -> _Invalid:
        # A __post_init__ check refused the values.
        return _Invalid(f"rejected by {self.cls.__qualname__}: {exc}")

    def _encode_checked(self, obj: object, depth: int) -> list:
        if depth >= MAX_DEPTH:
            raise _Invalid(f"messages nested deeper than {MAX_DEPTH}")
        depth += 1
        out = []
        i = 0
        try:
            for i, (enc, value) in enumerate(zip(self.encs, self.getter(obj))):
                out.append(enc(value, depth))
        except _Invalid as exc:
            exc.path.append(f".{self.names[i]}")
            raise
        return [self.tag, out]

    def _decode_checked(self, fields: object, depth: int) -> object:
        if type(fields) is not tuple:
            raise _Invalid(f"expected an array of fields, got {_kind(fields)}")
        n = len(fields)
        if n > len(self.names):
            raise _Invalid(f"{n} fields, this version knows {len(self.names)} ({', '.join(self.names)})")
        if n < self.min_fields:
            raise _Invalid(f"missing field {self.names[n]!r} ({n} fields, at least {self.min_fields} required)")
        values = []
        i = 0
        try:
            for i, (dec, value) in enumerate(zip(self.decs, fields)):
                values.append(dec(value, depth))
        except _Invalid as exc:
            exc.path.append(f".{self.names[i]}")
            raise
        try:
            if self.positional:
                return self.cls(*values)
            return self.cls(**dict(zip(self.names, values)))
        except Exception as exc:
            raise self._rejected(exc) from None


class _Unresolved(Exception):
    """Internal: annotations name something not defined yet; retry on first use."""


_by_tag: dict[str, type] = {}
_tag_of: dict[type, str] = {}
_codecs: dict[type, _Codec] = {}


def message(tag: str) -> Callable[[type], type]:
    """Class decorator: register a dataclass as a wire message under ``tag``.

    Put it above ``@dataclass``.  Tags are global and permanent (they are what
    peers send); a duplicate tag raises ``ValueError``, an unsupported
    annotation raises ``TypeError`` as soon as the annotations can be resolved.
    """
    if not isinstance(tag, str) or not tag:
        raise ValueError(f"message tag must be a non-empty str, got {tag!r}")

    def register(cls: type) -> type:
        if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
            raise TypeError(f"@message({tag!r}) must decorate a dataclass (put it above @dataclass)")
        if tag in _by_tag:
            raise ValueError(f"message tag {tag!r} is already registered by {_by_tag[tag].__qualname__}")
        if cls in _tag_of:
            raise ValueError(f"{cls.__qualname__} is already registered as {_tag_of[cls]!r}")
        _by_tag[tag] = cls
        _tag_of[cls] = tag
        try:
            _codecs[cls] = _Codec(cls, tag)
        except _Unresolved:
            pass  # forward reference: compiled on first use
        except TypeError:
            del _by_tag[tag], _tag_of[cls]
            raise
        return cls

    return register


def registered() -> dict[str, type]:
    """A copy of the registry: tag -> class."""
    return dict(_by_tag)


def tag_of(cls: type) -> str:
    """The tag ``cls`` is registered under (``KeyError`` if it is not a message)."""
    return _tag_of[cls]


def _codec(cls: type) -> _Codec:
    codec = _codecs.get(cls)
    if codec is None:
        tag = _tag_of.get(cls)
        if tag is None:
            raise _Invalid(f"{cls.__qualname__} is not a registered message type")
        try:
            codec = _codecs[cls] = _Codec(cls, tag)
        except _Unresolved as exc:
            raise TypeError(str(exc)) from None
    return codec


# -- per-type codecs ------------------------------------------------------------------------


def _compile(tp: object, where: str) -> tuple[_Enc, _Dec]:
    """(encoder, decoder) for one annotation.  Both take ``(value, depth)``."""
    if tp is int:
        return _enc_int, _dec_int
    if tp is float:
        return _enc_float, _dec_float
    if tp is bool:
        return _enc_bool, _dec_bool
    if tp is str:
        return _enc_str, _dec_str
    if tp is bytes:
        return _enc_bytes, _dec_bytes
    if tp is None or tp is type(None):
        return _enc_none, _dec_none
    if tp is object or tp is Any:
        return _enc_message, _dec_any_message
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if tp not in _tag_of:
            raise TypeError(f"{where}: {tp.__qualname__} is a dataclass but not a registered message")
        return _message_encoder(tp), _message_decoder(tp)

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1 or len(args) != 2:
            raise TypeError(f"{where}: unions other than `X | None` are not supported ({tp})")
        enc, dec = _compile(rest[0], where)

        def enc_optional(v: object, depth: int, enc: _Enc = enc) -> object:
            return None if v is None else enc(v, depth)

        def dec_optional(v: object, depth: int, dec: _Dec = dec) -> object:
            return None if v is None else dec(v, depth)

        return enc_optional, dec_optional
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _tuple_codec(args[0], where)
        if not args or args == ((),):
            raise TypeError(f"{where}: bare or empty tuple annotations are not supported; use tuple[T, ...]")
        return _fixed_tuple_codec(args, where)
    if origin is dict:
        if len(args) != 2 or args[0] is not str:
            raise TypeError(f"{where}: only dict[str, T] is supported ({tp})")
        return _dict_codec(args[1], where)
    raise TypeError(f"{where}: unsupported annotation {tp!r}")


def _expected(what: str, v: object) -> _Invalid:
    return _Invalid(f"expected {what}, got {_kind(v)}")


def _enc_int(v: object, depth: int) -> int:
    if type(v) is int:
        return v
    if isinstance(v, int) and not isinstance(v, bool):  # IntEnum and friends
        return int(v)
    raise _expected("int", v)


def _dec_int(v: object, depth: int) -> int:
    if type(v) is int:
        return v
    raise _expected("int", v)


def _enc_float(v: object, depth: int) -> float:
    if type(v) is float:
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)  # canonical: equal messages encode equally
    raise _expected("float", v)


def _dec_float(v: object, depth: int) -> float:
    t = type(v)
    if t is float:
        return v
    if t is int:
        return float(v)  # msgpack peers (and old senders) may write 1 for 1.0
    raise _expected("float", v)


def _enc_bool(v: object, depth: int) -> bool:
    if type(v) is bool:
        return v
    raise _expected("bool", v)


_dec_bool = _enc_bool


def _enc_str(v: object, depth: int) -> str:
    if type(v) is str:
        return v
    if isinstance(v, str):
        return str.__str__(v)  # a plain copy of a str subclass (StrEnum)
    raise _expected("str", v)


def _dec_str(v: object, depth: int) -> str:
    if type(v) is str:
        return v
    raise _expected("str", v)


def _enc_bytes(v: object, depth: int) -> bytes:
    if type(v) is bytes:
        return v
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    raise _expected("bytes", v)


def _dec_bytes(v: object, depth: int) -> bytes:
    if type(v) is bytes:
        return v
    raise _expected("bytes", v)


def _enc_none(v: object, depth: int) -> None:
    if v is None:
        return None
    raise _expected("nil", v)


_dec_none = _enc_none

# Annotations whose decoded value is the msgpack value itself, checked by exact
# type: containers of these are validated in one pass without per-item calls.
_EXACT: dict[object, type] = {int: int, bool: bool, str: str, bytes: bytes}


def _enc_message(v: object, depth: int) -> list:
    return _codec(type(v)).encode(v, depth)


def _decode_tagged(v: object, depth: int, base: type | None) -> object:
    if type(v) is not tuple or len(v) != 2:
        raise _Invalid(f"expected a [tag, fields] message, got {_kind(v)}")
    tag, fields = v
    cls = _by_tag.get(tag) if type(tag) is str else None
    if cls is None:
        raise _Invalid(f"unknown message tag {tag!r}")
    if base is not None and not issubclass(cls, base):
        raise _Invalid(f"expected a {_tag_of[base]!r} message, got {tag!r}")
    if depth >= MAX_DEPTH:
        raise _Invalid(f"messages nested deeper than {MAX_DEPTH}")
    return _codec(cls).decode(fields, depth + 1)


def _dec_any_message(v: object, depth: int) -> object:
    return _decode_tagged(v, depth, None)


def _message_encoder(cls: type) -> _Enc:
    name = cls.__qualname__

    def enc_message(v: object, depth: int) -> list:
        # The peer will insist on this class (or a subclass): refuse here, where
        # the traceback points at the sender's bug.
        if not isinstance(v, cls):
            raise _expected(name, v)
        return _codec(type(v)).encode(v, depth)

    return enc_message


def _message_decoder(cls: type) -> _Dec:
    tag = _tag_of[cls]
    codec: list[_Codec] = []  # resolved on first use: cls may still be compiling

    def dec_message(v: object, depth: int) -> object:
        # Fast path: exactly the annotated class (no subclass lookup).
        if type(v) is tuple and len(v) == 2 and v[0] == tag and depth < MAX_DEPTH:
            if not codec:
                codec.append(_codec(cls))
            return codec[0].decode(v[1], depth + 1)
        return _decode_tagged(v, depth, cls)

    return dec_message


def _tuple_codec(item: object, where: str) -> tuple[_Enc, _Dec]:
    exact = _EXACT.get(item)
    if exact is not None:
        # Fast path: the msgpack array (already a tuple) is the value.
        name = exact.__name__

        def enc_tuple_exact(v: object, depth: int) -> object:
            if type(v) is not tuple and type(v) is not list:
                raise _expected("tuple", v)
            for i, x in enumerate(v):
                if type(x) is not exact:
                    return [_item(enc_item, x, i, depth) for i, x in enumerate(v)]
            return v

        enc_item = _compile(item, where)[0]  # converts subclasses (IntEnum, StrEnum)

        def dec_tuple_exact(v: object, depth: int) -> tuple:
            if type(v) is not tuple:
                raise _expected(f"array of {name}", v)
            for i, x in enumerate(v):
                if type(x) is not exact:
                    exc = _expected(name, x)
                    exc.path.append(f"[{i}]")
                    raise exc
            return v

        return enc_tuple_exact, dec_tuple_exact

    enc, dec = _compile(item, where)

    def enc_tuple(v: object, depth: int) -> list:
        if type(v) is not tuple and type(v) is not list:
            raise _expected("tuple", v)
        out = []
        i = 0
        try:
            for i, x in enumerate(v):
                out.append(enc(x, depth))
        except _Invalid as exc:
            exc.path.append(f"[{i}]")
            raise
        return out

    def dec_tuple(v: object, depth: int) -> tuple:
        if type(v) is not tuple:
            raise _expected("array", v)
        out = []
        i = 0
        try:
            for i, x in enumerate(v):
                out.append(dec(x, depth))
        except _Invalid as exc:
            exc.path.append(f"[{i}]")
            raise
        return tuple(out)

    return enc_tuple, dec_tuple


def _item(enc: _Enc, x: object, i: int, depth: int) -> object:
    try:
        return enc(x, depth)
    except _Invalid as exc:
        exc.path.append(f"[{i}]")
        raise


def _fixed_tuple_codec(items: tuple, where: str) -> tuple[_Enc, _Dec]:
    codecs = [_compile(a, where) for a in items]
    encs = tuple(c[0] for c in codecs)
    decs = tuple(c[1] for c in codecs)
    n = len(items)

    def enc_fixed(v: object, depth: int) -> list:
        if (type(v) is not tuple and type(v) is not list) or len(v) != n:
            raise _Invalid(f"expected a tuple of {n}, got {_describe_len(v)}")
        return [_item(e, x, i, depth) for i, (e, x) in enumerate(zip(encs, v))]

    dec_fixed_checked = _fixed_tuple_checked(n, decs)

    exact = tuple(_EXACT.get(a) for a in items)
    if None not in exact and n == 2:
        # Pairs of plain values (links, meta items) are most of a large view.
        t0, t1 = exact

        def dec_fixed(v: object, depth: int) -> tuple:
            if type(v) is tuple and len(v) == 2 and type(v[0]) is t0 and type(v[1]) is t1:
                return v
            return dec_fixed_checked(v, depth)

        def enc_pair(v: object, depth: int) -> object:
            if type(v) is tuple and len(v) == 2 and type(v[0]) is t0 and type(v[1]) is t1:
                return v
            return enc_fixed(v, depth)

        return enc_pair, dec_fixed

    return enc_fixed, dec_fixed_checked


def _fixed_tuple_checked(n: int, decs: tuple) -> _Dec:
    def dec_fixed_checked(v: object, depth: int) -> tuple:
        if type(v) is not tuple or len(v) != n:
            raise _Invalid(f"expected an array of {n}, got {_describe_len(v)}")
        return tuple([_item(d, x, i, depth) for i, (d, x) in enumerate(zip(decs, v))])

    return dec_fixed_checked


def _describe_len(v: object) -> str:
    if type(v) in (tuple, list):
        return f"an array of {len(v)}"
    return _kind(v)


def _dict_codec(value: object, where: str) -> tuple[_Enc, _Dec]:
    enc, dec = _compile(value, where)

    def enc_dict(v: object, depth: int) -> dict:
        if not isinstance(v, dict):
            raise _expected("dict", v)
        out = {}
        for k in sorted(v, key=_sort_key):  # sorted: deterministic bytes
            if type(k) is not str:
                raise _Invalid(f"expected str keys, got {_kind(k)} key {k!r}")
            try:
                out[k] = enc(v[k], depth)
            except _Invalid as exc:
                exc.path.append(f"[{k!r}]")
                raise
        return out

    def dec_dict(v: object, depth: int) -> dict:
        if type(v) is not dict:
            raise _expected("map", v)
        out = {}
        for k, x in v.items():
            if type(k) is not str:
                raise _Invalid(f"expected str keys, got {_kind(k)} key")
            try:
                out[k] = dec(x, depth)
            except _Invalid as exc:
                exc.path.append(f"[{k!r}]")
                raise
        return out

    return enc_dict, dec_dict


def _sort_key(k: object) -> tuple[str, str]:
    # Keys of mixed types must not make sorted() raise TypeError before the
    # str check can report them.
    return (type(k).__name__, str(k))


# -- public entry points --------------------------------------------------------------------


def encode(msg: object) -> bytes:
    """The msgpack bytes of a registered message (``SchemaError`` if it breaks its schema)."""
    cls = type(msg)
    tag = _tag_of.get(cls)
    if tag is None:
        raise SchemaError(f"cannot encode {cls.__qualname__}: not a registered message type")
    try:
        obj = _codec(cls).encode(msg, 0)
    except _Invalid as exc:
        raise SchemaError(f"cannot encode {tag!r} message: {exc.describe(tag)}") from None
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (OverflowError, ValueError, TypeError) as exc:  # an int beyond 64 bits
        raise SchemaError(f"cannot encode {tag!r} message: {exc}") from None


def decode(data: bytes | bytearray | memoryview) -> object:
    """The message in ``data``, validated against its registered class.

    Any problem at all (not msgpack, trailing bytes, unknown tag, wrong field
    count or type, too deep) raises :class:`SchemaError`.
    """
    n = len(data)
    try:
        # Limits bounded by the input: no announced length may exceed the bytes
        # actually present, so a 5-byte header cannot request a 4 GiB buffer.
        # use_list=False: arrays come back as tuples, already what frozen
        # dataclasses need.  Ext types (incl. timestamps) are not part of the schema.
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=False,
            strict_map_key=True,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n // 2,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises ValueError, StackError, UnicodeDecodeError, ...
        raise SchemaError(f"not a valid msgpack message ({n} bytes): {str(exc) or type(exc).__name__}") from None
    if type(obj) is not tuple or len(obj) != 2:
        raise SchemaError(f"not a message: expected a [tag, fields] array, got {_describe_len(obj)}")
    tag, fields = obj
    cls = _by_tag.get(tag) if type(tag) is str else None
    if cls is None:
        raise SchemaError(f"unknown message tag {tag!r}")
    try:
        return _codec(cls).decode(fields, 1)
    except _Invalid as exc:
        raise SchemaError(f"bad {tag!r} message: {exc.describe(tag)}") from None
    except RecursionError:  # belt and braces: MAX_DEPTH should make this unreachable
        raise SchemaError(f"bad {tag!r} message: nested too deeply") from None
