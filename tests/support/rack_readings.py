"""How real Rack releases read a request's parameters: a test oracle.

Canvas is a Rails app on Rack, so what a request *means* to Canvas is what Rack makes of it.
This module re-implements, in plain Python, the parts of Rack that turn a request into
parameters, for each Rack line Canvas has shipped:

* Rack 2.2 (tag v2.2.24; :data:`RackRelease.RACK_2_2`), and Debian 12's patched 2.2.22
  (``2.2.22-0+deb12u2``; :data:`RackRelease.RACK_2_2_DEBIAN12`), which is v2.2.24 less the
  obs-fold unfolding of part heads (v2.2.24 lib/rack/multipart/parser.rb:317-327);
* Rack 3.0 (tag v3.0.18; :data:`RackRelease.RACK_3_0`);
* Rack 3.1 (tag v3.1.22; :data:`RackRelease.RACK_3_1`).

It is meant for property tests of the form "for every generated request, either the broker
refuses it, or no Rack reading finds a forbidden key": :func:`read_request` gives one
release's whole reading (the method after ``Rack::MethodOverride``, and every key of
``Rack::Request#params`` at every depth), or raises :class:`RackRefused` where that release
raises while reading the request (Canvas then answers 400 or 500 and acts on nothing).
:func:`multipart_names`, :func:`urlencoded_names` and :func:`query_names` give the flat list
of names one body or query string yields, each with the top-level key Rack's nested-query
normalisation files it under.

Faithfulness over breadth: where the model would have to guess (bodies over Rack's 1 MiB
read buffer, text in multi-byte non-UTF-8 charsets, a temporary file name within a few bytes
of the file system's limit), it raises :class:`RackUnmodelled` instead of answering. A
property test should treat that as "the broker must refuse this" or discard the example.

Conventions. Bytes Rack reads are given back as ``str`` decoded from UTF-8 with
``surrogateescape``, so valid UTF-8 reads naturally and other bytes survive a round trip
(``name.encode("utf-8", "surrogateescape")``). Ruby exception class names are kept as Ruby
prints them. File and line references are to the Rack tags above, in the rack/rack
repository. Environment-dependent settings are taken at Rack's defaults (no
``RACK_*`` environment variables), Ruby 3.1 semantics (Debian 12's Ruby 3.1.2: its
``String#strip`` also strips NUL, its encoding table) and a UTF-8 locale.

The cross-validation against real Rack, and the traps found on the way, are written up in
the lead's notes (notes/rack.md, outside the repository).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Final, Literal, TypeAlias

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = [
    "RELEASES",
    "ParamName",
    "RackReading",
    "RackRefused",
    "RackRelease",
    "RackUnmodelled",
    "all_readings",
    "multipart_names",
    "query_names",
    "read_request",
    "urlencoded_names",
]


class RackRelease(Enum):
    """A Rack release this module models; the value is its version string."""

    RACK_2_2 = "2.2.24"
    RACK_2_2_DEBIAN12 = "2.2.22-0+deb12u2"
    RACK_3_0 = "3.0.18"
    RACK_3_1 = "3.1.22"

    @property
    def line(self) -> Literal["2.2", "3.0", "3.1"]:
        """The release line: ``"2.2"``, ``"3.0"`` or ``"3.1"``."""
        if self in {RackRelease.RACK_2_2, RackRelease.RACK_2_2_DEBIAN12}:
            return "2.2"
        return "3.0" if self is RackRelease.RACK_3_0 else "3.1"


RELEASES: Final = (RackRelease.RACK_2_2, RackRelease.RACK_3_0, RackRelease.RACK_3_1)
"""The three lines Canvas has shipped, at their latest tags."""


class RackRefused(Exception):  # noqa: N818 - named for what the oracle reports, as in the brief
    """The release raises while reading the request, so the app never acts on its params.

    ``errors`` lists ``(stage, ruby_class, message)`` in the order Rack raised them; stage is
    ``"method_override"`` (``Rack::MethodOverride`` itself failed: the app never ran),
    ``"GET"`` (the query string) or ``"POST"`` (the body). Where Ruby's class depends on
    something the model does not decide, ``ruby_class`` lists the candidates joined by ``|``.
    """

    def __init__(self, errors: tuple[tuple[str, str, str], ...]) -> None:
        self.errors = errors
        stage, cls, message = errors[0]
        super().__init__(f"{stage}: {cls}: {message}")

    @property
    def error(self) -> str:
        """The Ruby class of the first error."""
        return self.errors[0][1]


class RackUnmodelled(Exception):  # noqa: N818 - it is a verdict, not a failure of the caller
    """The model cannot say what this release does with the input (see the module doc)."""


@dataclass(frozen=True)
class ParamName:
    """One name Rack handed to its nested-query normaliser, and where it landed.

    ``raw`` is the whole name (``"a[b][]"``); ``top`` the top-level key it is filed under
    (``"a"``), or None when Rack drops it (e.g. ``"[]"`` or ``"=x"``). ``value`` is the text
    value, or None for an upload or a bare key; ``encoding`` is the Ruby encoding of the name.
    """

    raw: str
    top: str | None
    source: Literal["query", "urlencoded", "multipart"]
    value: str | None = None
    is_file: bool = False
    encoding: str = "UTF-8"


@dataclass(frozen=True)
class RackReading:
    """What one release makes of a request it accepts.

    ``method`` is the ``REQUEST_METHOD`` the app sees after ``Rack::MethodOverride``
    (``original_method`` is set when it changed it). ``get`` and ``post`` list the names read
    from the query string and the body; ``keys`` is every key path of ``Rack::Request#params``
    (``GET.merge(POST)``) at every depth, array positions as ints. ``params``, ``get_tree`` and
    ``post_tree`` are those hashes rendered the way tests/support/rack_replay.rb prints them.
    """

    release: RackRelease
    method: str
    original_method: str | None
    get: tuple[ParamName, ...]
    post: tuple[ParamName, ...]
    keys: tuple[tuple[str | int, ...], ...]
    params: object = field(repr=False)
    get_tree: object = field(repr=False)
    post_tree: object = field(repr=False)

    @property
    def top_keys(self) -> frozenset[str]:
        """The top-level keys of ``params``."""
        return frozenset(str(path[0]) for path in self.keys if len(path) == 1)

    @property
    def all_keys(self) -> frozenset[str]:
        """Every hash key at any depth of ``params``."""
        return frozenset(path[-1] for path in self.keys if isinstance(path[-1], str))


# --------------------------------------------------------------------------------------------
# Ruby strings: bytes plus an encoding.
# --------------------------------------------------------------------------------------------

_Kind: TypeAlias = Literal["utf8", "binary", "usascii", "single", "multi", "incompat"]

# Ruby 3.1.2's encoding table (Encoding.list, with every alias), by how the model treats
# the encoding: "single" is ASCII-compatible with one byte per character, "multi"
# ASCII-compatible with multi-byte characters (modelled for ASCII-only text only), and
# "incompat" ASCII-incompatible (any regexp or index on such a name raises).
_ENCODING_TABLE: Final[dict[_Kind, str]] = {
    "binary": "ASCII-8BIT BINARY",
    "utf8": "UTF-8 CP65001",
    "usascii": "US-ASCII ASCII ANSI_X3.4-1968 646",
    "incompat": (
        "UTF-16BE UCS-2BE | UTF-16LE | UTF-32BE UCS-4BE | UTF-32LE UCS-4LE | UTF-16 | UTF-32 | "
        "IBM037 ebcdic-cp-us | ISO-2022-JP ISO2022-JP | ISO-2022-JP-2 ISO2022-JP2 | CP50220 | "
        "CP50221 | UTF-7 CP65000 | ISO-2022-JP-KDDI"
    ),
    "multi": (
        "UTF8-MAC UTF-8-MAC UTF-8-HFS | EUC-JP eucJP | Windows-31J CP932 csWindows31J SJIS PCK | "
        "Big5 | Big5-HKSCS Big5-HKSCS:2008 | Big5-UAO | CESU-8 | CP949 | Emacs-Mule | "
        "EUC-KR eucKR | EUC-TW eucTW | GB18030 | GBK CP936 | Shift_JIS | CP950 | CP951 | "
        "stateless-ISO-2022-JP | eucJP-ms euc-jp-ms | CP51932 | EUC-JIS-2004 EUC-JISX0213 | "
        "GB2312 EUC-CN eucCN | GB12345 | MacJapanese MacJapan | UTF8-DoCoMo | SJIS-DoCoMo | "
        "UTF8-KDDI | SJIS-KDDI | stateless-ISO-2022-JP-KDDI | UTF8-SoftBank | SJIS-SoftBank"
    ),
    "single": (
        "ISO-8859-1 ISO8859-1 | ISO-8859-2 ISO8859-2 | ISO-8859-3 ISO8859-3 | "
        "ISO-8859-4 ISO8859-4 | ISO-8859-5 ISO8859-5 | ISO-8859-6 ISO8859-6 | "
        "ISO-8859-7 ISO8859-7 | ISO-8859-8 ISO8859-8 | ISO-8859-9 ISO8859-9 | "
        "ISO-8859-10 ISO8859-10 | ISO-8859-11 ISO8859-11 | ISO-8859-13 ISO8859-13 | "
        "ISO-8859-14 ISO8859-14 | ISO-8859-15 ISO8859-15 | ISO-8859-16 ISO8859-16 | "
        "KOI8-R CP878 | KOI8-U | Windows-1250 CP1250 | Windows-1251 CP1251 | "
        "Windows-1252 CP1252 | Windows-1253 CP1253 | Windows-1254 CP1254 | "
        "Windows-1257 CP1257 | IBM437 CP437 | IBM720 CP720 | IBM737 CP737 | IBM775 CP775 | "
        "CP850 IBM850 | IBM852 | CP852 | IBM855 | CP855 | IBM857 CP857 | IBM860 CP860 | "
        "IBM861 CP861 | IBM862 CP862 | IBM863 CP863 | IBM864 CP864 | IBM865 CP865 | "
        "IBM866 CP866 | IBM869 CP869 | Windows-1258 CP1258 | GB1988 | macCentEuro | "
        "macCroatian | macCyrillic | macGreek | macIceland | macRoman | macRomania | macThai | "
        "macTurkish | macUkraine | Windows-1256 CP1256 | Windows-1255 CP1255 | TIS-620 | "
        "Windows-874 CP874"
    ),
}


def _build_encodings() -> tuple[dict[bytes, str], dict[str, _Kind]]:
    lookup: dict[bytes, str] = {}
    kinds: dict[str, _Kind] = {}
    for kind, groups in _ENCODING_TABLE.items():
        for group in groups.split("|"):
            names = group.split()
            kinds[names[0]] = kind
            for alias in names:
                lookup[alias.lower().encode()] = names[0]
    # Under a UTF-8 locale these three are UTF-8; "internal" is nil (no default_internal).
    for special in (b"locale", b"external", b"filesystem"):
        lookup[special] = "UTF-8"
    return lookup, kinds


_ENCODING_LOOKUP, _ENCODING_KIND = _build_encodings()
_UTF8: Final = "UTF-8"
_BINARY: Final = "ASCII-8BIT"
_RUBY_WHITESPACE: Final = b"\x00\t\n\v\f\r "


class _RubyError(Exception):
    """A Ruby exception the modelled code raises: its class and message."""

    def __init__(self, cls: str, message: str = "") -> None:
        super().__init__(f"{cls}: {message}")
        self.cls = cls
        self.message = message


def _encoding_find(name: bytes | None) -> str | None:
    """``Encoding.find(name)``: a canonical name, None for ``"internal"``, or it raises."""
    if name is None:
        raise _RubyError("TypeError", "no implicit conversion of nil into String")
    if name.lower() == b"internal":
        return None
    try:
        return _ENCODING_LOOKUP[name.lower()]
    except KeyError:
        shown = name.decode("utf-8", "replace")
        raise _RubyError("ArgumentError", f"unknown encoding name - {shown}") from None


def _force_encoding(enc: str | None) -> str:
    if enc is None:
        raise _RubyError("TypeError", "no implicit conversion of nil into String")
    return enc


@dataclass(frozen=True)
class _RStr:
    """A Ruby String: bytes tagged with an encoding (canonical Ruby name)."""

    data: bytes
    enc: str = _UTF8

    @property
    def kind(self) -> _Kind:
        return _ENCODING_KIND[self.enc]

    @property
    def ascii_only(self) -> bool:
        return self.kind != "incompat" and self.data.isascii()

    @property
    def key(self) -> tuple[bytes, str | None]:
        """Hash identity: Ruby's String#hash/eql? ignore the encoding of ASCII-only text."""
        return (self.data, None if self.ascii_only else self.enc)

    def view(self) -> str:
        """The text with one Python character per Ruby character."""
        kind = self.kind
        if kind == "utf8":
            return self.data.decode("utf-8", "surrogateescape")
        if kind in {"binary", "usascii", "single"}:
            return self.data.decode("latin-1")
        if kind == "multi" and self.data.isascii():
            return self.data.decode("ascii")
        if kind == "multi":
            raise RackUnmodelled(f"non-ASCII text in {self.enc}")
        raise _RubyError(
            "Encoding::CompatibilityError",
            f"incompatible character encodings: {self.enc} and UTF-8",
        )

    @classmethod
    def from_view(cls, view: str, enc: str) -> _RStr:
        if _ENCODING_KIND[enc] == "utf8":
            return cls(view.encode("utf-8", "surrogateescape"), enc)
        return cls(view.encode("latin-1"), enc)

    def broken(self) -> bool:
        """Ruby's ``!valid_encoding?`` for the kinds the model reads."""
        kind = self.kind
        if kind == "utf8":
            try:
                self.data.decode("utf-8")
            except UnicodeDecodeError:
                return True
            return False
        if kind == "usascii":
            return not self.data.isascii()
        return False

    def check_regexp(self) -> None:
        """Raise as Ruby does when an ASCII regexp is matched against this string."""
        kind = self.kind
        if kind == "incompat":
            raise _RubyError(_incompat_regexp_error(self), f"regexp match against {self.enc}")
        if kind == "multi" and not self.data.isascii():
            raise RackUnmodelled(f"regexp on non-ASCII {self.enc} text")
        if self.broken():
            raise _RubyError("ArgumentError", f"invalid byte sequence in {self.enc}")

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "surrogateescape")


_STRICT_CODECS: Final = {
    "UTF-16BE": "utf-16-be",
    "UTF-16LE": "utf-16-le",
    "UTF-32BE": "utf-32-be",
    "UTF-32LE": "utf-32-le",
}


def _incompat_regexp_error(s: _RStr) -> str:
    """Ruby raises ArgumentError for a broken string, else Encoding::CompatibilityError."""
    codec = _STRICT_CODECS.get(s.enc)
    if codec is None:
        return "ArgumentError|Encoding::CompatibilityError"
    try:
        s.data.decode(codec)
    except UnicodeDecodeError:
        return "ArgumentError"
    return "Encoding::CompatibilityError"


def _ruby_strip(data: bytes) -> bytes:
    return data.strip(_RUBY_WHITESPACE)


def _ruby_lstrip(data: bytes) -> bytes:
    return data.lstrip(_RUBY_WHITESPACE)


def _ruby_split(data: bytes, sep: bytes) -> list[bytes]:
    """``String#split(sep)``: trailing empty fields are dropped."""
    parts = data.split(sep)
    while parts and not parts[-1]:
        parts.pop()
    return parts


def _ruby_split_re(data: bytes, pattern: re.Pattern[bytes]) -> list[bytes]:
    parts = pattern.split(data)
    while parts and not parts[-1]:
        parts.pop()
    return parts


def _ruby_split_limit(data: bytes, sep: bytes, limit: int) -> list[bytes]:
    """``String#split(sep, limit)``: an empty string gives no fields at all."""
    return data.split(sep, limit - 1) if data else []


# --------------------------------------------------------------------------------------------
# Values in a params tree.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Text:
    data: bytes
    enc: str = _UTF8


@dataclass(frozen=True)
class _Upload:
    """Rack's upload hash ``{filename:, type:, name:, tempfile:, head:}``."""

    filename: _RStr | None
    type: bytes | None
    name: bytes
    head: bytes
    head_enc: str = _BINARY


@dataclass(frozen=True)
class _UploadPairs:
    """``Array(upload_hash)``: what Rack 2.2 makes of an upload named ``x[][]``."""

    upload: _Upload


class _Params:
    """A Rack params hash (``Rack::QueryParser::Params``), ordered, keyed like a Ruby Hash.

    ``limit`` is Rack 2.2's key space limit (lib/rack/query_parser.rb:207-222): the summed
    length of a hash's distinct keys may not pass it. Rack 3 has none.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.items: dict[tuple[bytes, str | None], tuple[_RStr, _Value]] = {}
        self.limit = limit
        self.size = 0

    def get(self, key: _RStr) -> _Value:
        found = self.items.get(key.key)
        return None if found is None else found[1]

    def has(self, key: _RStr) -> bool:
        return key.key in self.items

    def set(self, key: _RStr, value: _Value) -> None:
        existing = self.items.get(key.key)
        if self.limit is not None:
            if existing is None:
                self.size += len(key.view())
            if self.size > self.limit:
                raise _RubyError(
                    "Rack::QueryParser::QueryLimitError", "exceeded available parameter key space"
                )
        self.items[key.key] = ((existing[0] if existing else key), value)

    def merged(self, other: _Params) -> _Params:
        out = _Params()
        out.items = {**self.items, **other.items}
        for k, (orig, _v) in self.items.items():
            if k in other.items:
                out.items[k] = (orig, other.items[k][1])
        return out


_Value: TypeAlias = "_Text | _Upload | _UploadPairs | _Params | list[_Value] | None"


# --------------------------------------------------------------------------------------------
# Nested-query normalisation (Rack::QueryParser#normalize_params).
# --------------------------------------------------------------------------------------------

_PARAM_DEPTH_LIMIT_2_2: Final = 100  # v2.2.24 lib/rack/utils.rb:34 (make_default(65536, 100))
_KEY_SPACE_LIMIT_2_2: Final = 65536
_PARAM_DEPTH_LIMIT_3: Final = 32  # v3.0.18 / v3.1.22 lib/rack/utils.rb:33 / :35
_BYTESIZE_LIMIT: Final = 4194304  # lib/rack/query_parser.rb BYTESIZE_LIMIT, all three
_PARAMS_LIMIT: Final = 4096  # lib/rack/query_parser.rb PARAMS_LIMIT, all three

_KEY_2_2: Final = re.compile(r"[\[\]]*([^\[\]]+)\]*")
_ARRAY_HASH_2_2: Final = re.compile(r"^\[\]\[([^\[\]]+)\]$", re.MULTILINE)
_ARRAY_ANY_2_2: Final = re.compile(r"^\[\](.+)$", re.MULTILINE)
_HAS_ARRAY: Final = re.compile(r"\[\]")
_BRACKETS: Final = re.compile(r"[\[\]]+")


class _Normaliser:
    """One release's ``normalize_params`` over one params hash."""

    def __init__(self, line: str) -> None:
        self.line = line

    def make_params(self) -> _Params:
        return _Params(_KEY_SPACE_LIMIT_2_2 if self.line == "2.2" else None)

    def normalize(self, params: _Params, name: _RStr | None, value: _Value) -> None:
        if self.line == "2.2":
            self._normalize_2_2(params, name, value, _PARAM_DEPTH_LIMIT_2_2)
        else:
            self._normalize_3(params, name, value, 0)

    def top_key(self, name: _RStr | None) -> str | None:
        """The top-level key ``name`` is filed under (None: dropped); names that raise never
        get here.
        """
        if name is None:
            return None
        view = name.view()
        if self.line == "2.2":
            match = _KEY_2_2.match(view)
            key = match.group(1) if match else ""
            after = view[match.end() :] if match else ""
        else:
            start = view.find("[", 1)
            key, after = (view, "") if start < 0 else (view[:start], view[start:])
        if not key:
            return None
        return _RStr.from_view(view if after == "[" else key, name.enc).text

    def _has_key(self, params: _Params, key: str, enc: str) -> bool:
        """``params_hash_has_key?`` (v2.2.24 query_parser.rb:175-185, v3.1.22 :208-218)."""
        _RStr.from_view(key, enc).check_regexp()
        if _HAS_ARRAY.search(key):
            return False
        node: _Value = params
        parts = _BRACKETS.split(key)
        while parts and not parts[-1]:
            parts.pop()
        for part in parts:
            if not part:
                continue
            if not isinstance(node, _Params) or not node.has(_RStr.from_view(part, enc)):
                return False
            node = node.get(_RStr.from_view(part, enc))
        return True

    def _array(self, params: _Params, key: _RStr) -> list[_Value]:
        current = params.get(key)
        if current is None:
            current = []
            params.set(key, current)
        if not isinstance(current, list):
            raise _RubyError(
                "Rack::QueryParser::ParameterTypeError",
                f"expected Array (got {_ruby_class(current)}) for param `{key.text}'",
            )
        return current

    def _hash(self, params: _Params, key: _RStr) -> _Params:
        current = params.get(key)
        if current is None:
            current = self.make_params()
            params.set(key, current)
        if not isinstance(current, _Params):
            raise _RubyError(
                "Rack::QueryParser::ParameterTypeError",
                f"expected Hash (got {_ruby_class(current)}) for param `{key.text}'",
            )
        return current

    def _normalize_2_2(
        self, params: _Params, name: _RStr | None, value: _Value, depth: int
    ) -> _Value:
        """v2.2.24 lib/rack/query_parser.rb:116-155."""
        if depth <= 0:
            raise _RubyError("Rack::QueryParser::QueryLimitError", "")
        if name is None:
            view, key_view, after = "", "", ""
            enc = _UTF8
        else:
            name.check_regexp()
            view, enc = name.view(), name.enc
            match = _KEY_2_2.match(view)
            key_view = match.group(1) if match else ""
            after = view[match.end() :] if match else ""
        if not key_view:
            if value is not None and view == "[]":
                return _ruby_array(value)
            return None
        key = _RStr.from_view(key_view, enc)
        if after == "":
            params.set(key, value)
        elif after == "[":
            params.set(_RStr.from_view(view, enc), value)
        elif after == "[]":
            self._array(params, key).append(value)
        elif (m := _ARRAY_HASH_2_2.search(after)) or (m := _ARRAY_ANY_2_2.search(after)):
            child = m.group(1)
            array = self._array(params, key)
            last = array[-1] if array else None
            if isinstance(last, _Params) and not self._has_key(last, child, enc):
                self._normalize_2_2(last, _RStr.from_view(child, enc), value, depth - 1)
            else:
                fresh = self.make_params()
                array.append(
                    self._normalize_2_2(fresh, _RStr.from_view(child, enc), value, depth - 1)
                )
        else:
            child_params = self._hash(params, key)
            params.set(
                key,
                self._normalize_2_2(child_params, _RStr.from_view(after, enc), value, depth - 1),
            )
        return params

    def _normalize_3(  # noqa: C901, PLR0912 - mirrors Rack 3's branches one for one
        self, params: _Params, name: _RStr | None, value: _Value, depth: int
    ) -> _Value:
        """v3.0.18 / v3.1.22 lib/rack/query_parser.rb:126-192 (identical in both)."""
        if depth >= _PARAM_DEPTH_LIMIT_3:
            raise _RubyError("Rack::QueryParser::QueryLimitError", "")
        enc = name.enc if name is not None else _UTF8
        view = name.view() if name is not None else ""
        if name is None:
            key_view = after = ""
        elif depth == 0:
            start = view.find("[", 1)
            key_view, after = (view, "") if start < 0 else (view[:start], view[start:])
        elif view.startswith("[]"):
            key_view, after = "[]", view[2:]
        elif view.startswith("[") and (close := view.find("]", 1)) >= 0:
            key_view, after = view[1:close], view[close + 1 :]
        else:
            key_view, after = view, ""
        if not key_view:
            return None
        # A "[]" key is Rack's own literal (UTF-8), not a slice of the name.
        literal = depth != 0 and view.startswith("[]")
        key = _RStr.from_view(key_view, _UTF8 if literal else enc)
        if after == "":
            if key_view == "[]" and depth != 0:
                return [value]
            params.set(key, value)
        elif after == "[":
            params.set(_RStr.from_view(view, enc), value)
        elif after == "[]":
            self._array(params, key).append(value)
        elif after.startswith("[]"):
            child = after[2:]
            if len(after) >= 4 and after[2] == "[" and after.endswith("]"):
                inner = after[3:-1]
                if inner and "[" not in inner and "]" not in inner:
                    child = inner
            array = self._array(params, key)
            last = array[-1] if array else None
            if isinstance(last, _Params) and not self._has_key(last, child, enc):
                self._normalize_3(last, _RStr.from_view(child, enc), value, depth + 1)
            else:
                fresh = self.make_params()
                array.append(
                    self._normalize_3(fresh, _RStr.from_view(child, enc), value, depth + 1)
                )
        else:
            child_params = self._hash(params, key)
            params.set(
                key, self._normalize_3(child_params, _RStr.from_view(after, enc), value, depth + 1)
            )
        return params


def _ruby_array(value: _Value) -> _Value:
    """``Array(v)`` for the leaf values Rack passes."""
    if isinstance(value, _Upload):
        return _UploadPairs(value)
    if isinstance(value, list):
        return value
    return [value]


def _ruby_class(value: _Value) -> str:
    if isinstance(value, _Params):
        return "Rack::QueryParser::Params"
    if isinstance(value, list):
        return "Array"
    if isinstance(value, _Text):
        return "String"
    if isinstance(value, _Upload):
        return "Hash"
    return "NilClass"


# --------------------------------------------------------------------------------------------
# Query strings and urlencoded bodies (Rack::QueryParser#parse_nested_query).
# --------------------------------------------------------------------------------------------

_BAD_PERCENT: Final = re.compile(rb"%(?![0-9a-fA-F]{2})")
_WWW_ESCAPE: Final = re.compile(rb"\+|%[0-9a-fA-F]{2}")


def _unescape(data: bytes) -> bytes:
    """``URI.decode_www_form_component`` (Ruby 3.1 lib/uri/common.rb:340-343)."""
    if _BAD_PERCENT.search(data):
        raise _RubyError("ArgumentError", f"invalid %-encoding ({data.decode('latin-1')})")
    return _WWW_ESCAPE.sub(lambda m: b" " if m[0] == b"+" else bytes([int(m[0][1:], 16)]), data)


def _parse_nested_query(
    line: str, qs: bytes, separators: bytes, source: Literal["query", "urlencoded"]
) -> tuple[_Params, list[ParamName]]:
    """``parse_nested_query(qs, separators)``: v2.2.24 query_parser.rb:97-111, v3.x :101-115.

    Splits on any separator character followed by any number of spaces (``/[&;] */n``), so
    ``a=1&  as_user_id=2`` yields ``as_user_id``; checks the byte-size and parameter-count
    limits first (:187-201 / :220-234); wraps every ArgumentError (bad %-escapes, invalid
    UTF-8 under 2.2's regexp) as InvalidParameterError.
    """
    norm = _Normaliser(line)
    params = norm.make_params()
    names: list[ParamName] = []
    if not qs:
        return params, names
    if len(qs) > _BYTESIZE_LIMIT:
        raise _RubyError(
            "Rack::QueryParser::QueryLimitError",
            f"total query size exceeds limit ({_BYTESIZE_LIMIT})",
        )
    count = sum(qs.count(bytes([c])) for c in separators)
    if count >= _PARAMS_LIMIT:
        raise _RubyError(
            "Rack::QueryParser::QueryLimitError",
            f"total number of query parameters ({count + 1}) exceeds limit ({_PARAMS_LIMIT})",
        )
    splitter = re.compile(b"[" + re.escape(separators) + b"] *")
    try:
        for piece in _ruby_split_re(qs, splitter):
            fields = [_unescape(f) for f in _ruby_split_limit(piece, b"=", 2)]
            name = _RStr(fields[0]) if fields else None
            value = _Text(fields[1]) if len(fields) > 1 else None
            norm.normalize(params, name, value)
            if name is not None:
                names.append(
                    ParamName(
                        raw=name.text,
                        top=norm.top_key(name),
                        source=source,
                        value=None
                        if value is None
                        else value.data.decode("utf-8", "surrogateescape"),
                    )
                )
    except _RubyError as exc:
        if exc.cls == "ArgumentError":
            raise _RubyError("Rack::QueryParser::InvalidParameterError", exc.message) from exc
        raise
    return params, names


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value


def _guard(call: Callable[[], tuple[_Params, list[ParamName]]]) -> list[ParamName]:
    try:
        return call()[1]
    except _RubyError as exc:
        raise RackRefused((("POST", exc.cls, exc.message),)) from exc


def query_names(release: RackRelease, query: str | bytes) -> list[ParamName]:
    """The names ``Rack::Request#GET`` reads from a query string, in order.

    Rack 2.2 splits the query string on ``&`` *and* ``;`` (v2.2.24 lib/rack/request.rb:430,
    ``parse_query(query_string, '&;')``); Rack 3.0 and 3.1 on ``&`` only (v3.0.18
    request.rb:488, v3.1.22 :493). Raises :class:`RackRefused` where ``#GET`` raises.
    """
    seps = b"&;" if release.line == "2.2" else b"&"
    try:
        return _parse_nested_query(release.line, _as_bytes(query), seps, "query")[1]
    except _RubyError as exc:
        raise RackRefused((("GET", exc.cls, exc.message),)) from exc


def urlencoded_names(release: RackRelease, body: bytes) -> list[ParamName]:
    """The names ``Rack::Request#POST`` reads from an urlencoded body, in order.

    ``&`` is the only separator in every release; a single trailing NUL is dropped first
    ("Fix for Safari", v2.2.24 request.rb:452-454). Raises :class:`RackRefused` where
    ``#POST`` raises.
    """
    return _guard(lambda: _urlencoded(release, body))


def _urlencoded(release: RackRelease, body: bytes) -> tuple[_Params, list[ParamName]]:
    # 2.2 and 3.1 read at most bytesize_limit + 2 bytes (v2.2.24 request.rb:450,
    # v3.1.22 :534); 3.0 reads everything (v3.0.18 request.rb:520).
    form = body if release.line == "3.0" else body[: _BYTESIZE_LIMIT + 2]
    if form.endswith(b"\x00"):
        form = form[:-1]
    return _parse_nested_query(release.line, form, b"&", "urlencoded")


# --------------------------------------------------------------------------------------------
# multipart/form-data (Rack::Multipart::Parser).
# --------------------------------------------------------------------------------------------

_BUFSIZE: Final = 1_048_576  # Parser::BUFSIZE in all three releases
_FILE_LIMIT: Final = 128  # Utils.multipart_file_limit (RACK_MULTIPART_FILE_LIMIT)
_TOTAL_PART_LIMIT: Final = 4096  # Utils.multipart_total_part_limit
_BOUNDARY_START_LIMIT: Final = 16 * 1024  # v3.1.22 parser.rb:50 (v2.2.24 :23)
_MIME_HEADER_LIMIT: Final = 64 * 1024  # v3.1.22 parser.rb:53 (v2.2.24 :26)
_DISPOSITION_MAX_PARAMS: Final = 16  # v3.1.22 parser.rb:361
_DISPOSITION_MAX_BYTES: Final = 1536  # v3.1.22 parser.rb:362
_QUOTED_ESCAPES_LIMIT: Final = 8 * 1024  # v3.1.22 parser.rb:75
_NAME_MAX: Final = 255  # the temporary directory's file-name limit (Linux)

_EMPTY_CONTENT: Final = {
    "2.2": "EOFError",
    "3.0": "Rack::Multipart::EmptyContentError",
    "3.1": "Rack::Multipart::EmptyContentError",
}

# Boundary extraction: v2.2.24 lib/rack/multipart.rb:15, v3.0.18 parser.rb:22 (greedy: the
# *last* "boundary=" wins, and neither check below exists), v3.1.22 parser.rb:36.
_MULTIPART_LAZY: Final = re.compile(rb'\Amultipart/.*?boundary(\s*)="?([^";,]+)"?', re.IGNORECASE)
_MULTIPART_GREEDY: Final = re.compile(rb'\Amultipart/.*boundary="?([^";,]+)"?', re.IGNORECASE)
_ANOTHER_BOUNDARY: Final = re.compile(rb"boundary\s*=", re.IGNORECASE)

# Rack 2.2 and 3.0's header regexps (v2.2.24 lib/rack/multipart.rb:16-37, v3.0.18
# parser.rb:23-44). Ruby's #{} interpolation wraps each piece in a group; so do these.
_TOKEN: Final = rb'[^\s()<>,;:\\"/\[\]?=]+'
_VALUE: Final = rb'(?:"(?:\\"|[^"])*"|' + _TOKEN + rb")"
_CONDISP: Final = rb"(?:Content-Disposition:\s*" + _TOKEN + rb"\s*)"
_BROKEN: Final = re.compile(
    rb"^" + _CONDISP + rb".*;\s*filename=(" + _VALUE + rb")", re.IGNORECASE | re.MULTILINE
)
_CT_OLD: Final = re.compile(rb"Content-Type: (.*)\r\n", re.IGNORECASE)
_DISPOSITION_OLD: Final = re.compile(
    rb"Content-Disposition:[^:]*;\s*name=(" + _VALUE + rb")", re.IGNORECASE
)
_CONTENT_ID_OLD: Final = re.compile(rb"Content-ID:\s*([^\r\n]*)", re.IGNORECASE)
_ATTRIBUTE_CHAR: Final = rb"[^ \x00-\x1f\x7f)(><@,;:\\\"/\[\]?='*%]"
_ATTRIBUTE: Final = rb"(?:" + _ATTRIBUTE_CHAR + rb"+)"
_REGULAR_PARAMETER: Final = rb"(" + _ATTRIBUTE + rb"(?:\*[0-9]+)?)=(" + _VALUE + rb")"
_EXT_OTHER_VALUE: Final = rb"(?:%[0-9a-fA-F]{2}|" + _ATTRIBUTE_CHAR + rb")"
_EXT_OTHER_PARAMETER: Final = (
    rb"(" + _ATTRIBUTE + rb"\*[1-9][0-9]*\*)=(" + _EXT_OTHER_VALUE + rb"*)"
)
_EXT_INITIAL_PARAMETER: Final = (
    rb"(" + _ATTRIBUTE + rb"(?:\*0)?\*)=([a-zA-Z0-9\-]*'[a-zA-Z0-9\-]*'" + _EXT_OTHER_VALUE + rb"*)"
)
_DISPPARM: Final = (
    rb";\s*(?:"
    + _REGULAR_PARAMETER
    + rb"|(?:"
    + _EXT_INITIAL_PARAMETER
    + rb"|"
    + _EXT_OTHER_PARAMETER
    + rb"))\s*"
)
_DISPPARM_RE: Final = re.compile(_DISPPARM)
_RFC2183: Final = re.compile(
    rb"^" + _CONDISP + rb"((?:" + _DISPPARM + rb"))+$", re.IGNORECASE | re.MULTILINE
)
_QUOTED_LINE: Final = re.compile(rb'^"(.*)"$', re.MULTILINE)
_PERCENT_RUN: Final = re.compile(rb"%.?.?")
_PERCENT_HEX: Final = re.compile(rb"%[0-9a-fA-F]{2}")
_IE_BACKSLASH: Final = re.compile(rb'\\[^\\"]')
_BACKSLASH_ESCAPE: Final = re.compile(rb"\\(.)")
_OBS_UNFOLD: Final = re.compile(rb"\r\n([ \t])")

# Rack 3.1's anchored header regexps (v3.1.22 parser.rb:34-39).
_FWS: Final = rb"(?:[ \t]+(?:\r\n[ \t]+)?)"
_HEADER_VALUE: Final = rb"(?:[^\r\n]|\r\n[ \t])*"


def _header_3_1(name: bytes) -> re.Pattern[bytes]:
    return re.compile(
        rb"^" + name + rb":" + _FWS + rb"?(" + _HEADER_VALUE + rb")", re.IGNORECASE | re.MULTILINE
    )


_CT_3_1: Final = _header_3_1(b"Content-Type")
_DISPOSITION_3_1: Final = _header_3_1(b"Content-Disposition")
_CONTENT_ID_3_1: Final = _header_3_1(b"Content-ID")
_SLASHES: Final = re.compile(rb"[/\\]")
_QUOTE_OR_BACKSLASH: Final = re.compile(rb'["\\]')
_TMPNAME_SAFE: Final = frozenset(
    b",-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~"
)


@dataclass
class _Part:
    head: bytes
    name: bytes
    filename: _RStr | None
    content_type: bytes | None
    body: bytes = b""
    head_enc: str = _BINARY


def _boundary(release: RackRelease, content_type: bytes | None) -> bytes | None:
    """``Parser.parse_boundary`` (v2.2.24 parser.rb:88-101, v3.0.18 :85-90, v3.1.22 :110-123)."""
    if content_type is None:
        return None
    if release.line == "3.0":
        match = _MULTIPART_GREEDY.match(content_type)
        return match.group(1) if match else None
    match = _MULTIPART_LAZY.match(content_type)
    if match is None:
        return None
    cls = "EOFError" if release.line == "2.2" else "Rack::Multipart::BoundaryTooLongError"
    if match.group(1):
        raise _RubyError(cls, "whitespace between boundary parameter name and equal sign")
    if _ANOTHER_BOUNDARY.search(content_type, match.end()):
        raise _RubyError(cls, "multiple boundary parameters found in multipart content type")
    return match.group(2)


def _dequote(value: bytes) -> bytes:
    """WEBrick's ``dequote`` (v2.2.24 auth/digest/params.rb:15-19, v3.x parser.rb:256/299)."""
    match = re.fullmatch(rb'"(.*)"', value)
    inner = match.group(1) if match else value
    return _BACKSLASH_ESCAPE.sub(rb"\1", inner)


def _percent_decode_filename(filename: bytes, *, utf8: bool) -> bytes:
    """Percent-decode only if every ``%`` starts a valid escape, then ``scrub!``
    (v2.2.24 parser.rb:416-420, v3.1.22 :535-539).

    ``utf8`` says the parser's buffer is UTF-8: Rack's StringScanner starts as an empty UTF-8
    string and stays UTF-8 when the body appended to it is ASCII-only, so then the decoded
    filename is UTF-8 and ``scrub!`` turns invalid bytes into U+FFFD; a body with any
    non-ASCII byte makes the buffer ASCII-8BIT, and the bytes stay as they are.
    """
    if all(_PERCENT_HEX.match(run) for run in _PERCENT_RUN.findall(filename)):
        filename = _PERCENT_HEX.sub(lambda m: bytes([int(m[0][1:], 16)]), filename)
    if utf8:
        filename = filename.decode("utf-8", "replace").encode("utf-8")
    return filename


def _filename_old(line: str, head: bytes, *, utf8: bool) -> _RStr | None:  # noqa: C901 - as Rack
    """``get_filename`` of Rack 2.2 (v2.2.24 parser.rb:398-431) and 3.0 (v3.0.18 :363-396).

    When the strict RFC 2183 regexp matches a line, *every* ``; attr=value`` in the whole
    head is collected (later ones win) and ``filename`` is taken (2.2 prefers ``filename``,
    3.0 prefers ``filename*``); otherwise the lax BROKEN regexp takes the last
    ``; filename=`` of a Content-Disposition line.
    """
    filename: bytes | None = None
    charset: bytes | None = None
    star = False
    if _RFC2183.search(head):
        params: dict[bytes, bytes] = {}
        for match in _DISPPARM_RE.finditer(head):
            groups = [g for g in match.groups() if g is not None]
            params[groups[0]] = groups[1]
        order = (b"filename", b"filename*") if line == "2.2" else (b"filename*", b"filename")
        for key in order:
            if key in params:
                filename, star = params[key], key == b"filename*"
                break
        if filename is not None and star:
            charset, _lang, filename = filename.split(b"'", 2)
        elif filename is not None and (quoted := _QUOTED_LINE.search(filename)):
            filename = quoted.group(1)
    elif broken := _BROKEN.search(head):
        filename = broken.group(1)
        if quoted := _QUOTED_LINE.search(filename):
            filename = quoted.group(1)
    if filename is None:
        return None
    filename = _percent_decode_filename(filename, utf8=utf8)
    if not _IE_BACKSLASH.search(filename):
        filename = _BACKSLASH_ESCAPE.sub(rb"\1", filename)
    if star:
        return _RStr(filename, _force_encoding(_encoding_find(charset)))
    return _RStr(filename, _UTF8 if utf8 else _BINARY)


def _head_old(release: RackRelease, raw_head: bytes, *, utf8: bool) -> _Part:
    """``handle_mime_head`` of 2.2 (v2.2.24 parser.rb:314-351) and 3.0 (v3.0.18 :308-329).

    None of the regexps is anchored: ``Content-Type: `` (one space), ``Content-Disposition:``
    and ``Content-ID:`` match inside any header, e.g. ``X-Note: Content-Disposition: ;name=x``.
    The name is the *last* ``;\\s*name=`` before the next colon after a
    ``Content-Disposition:``, case-insensitively (``NAME=``), even inside a quoted filename.
    """
    head = raw_head
    if release is RackRelease.RACK_2_2:
        head = _OBS_UNFOLD.sub(rb"\1", head)
    ct_match = _CT_OLD.search(head)
    content_type = ct_match.group(1) if ct_match else None
    name: bytes | None
    if disposition := _DISPOSITION_OLD.search(head):
        name = _dequote(disposition.group(1))
    else:
        content_id = _CONTENT_ID_OLD.search(head)
        name = content_id.group(1) if content_id else None
    filename = _filename_old(release.line, head, utf8=utf8)
    if not name:
        name = filename.data if filename is not None else (content_type or b"text/plain") + b"[]"
    return _Part(raw_head, name, filename, content_type)


class _HeadState:
    """Per-request state Rack 3.1's disposition parser keeps (the quoted-escape count)."""

    def __init__(self) -> None:
        self.escapes = 0


def _disposition_3_1(  # noqa: C901, PLR0912 - one branch per branch of Rack's parser
    disposition: bytes, state: _HeadState
) -> tuple[bytes | None, tuple[bytes, bool] | None, tuple[bytes, bool] | None]:
    """Rack 3.1's hand-written disposition parser (v3.1.22 parser.rb:370-455).

    Skips to the first ``;`` (none: NoMethodError); then reads at most 16 ``attr=value``
    pairs. Attribute names are matched exactly and case-sensitively after left-stripping
    (``name``, ``filename``, ``filename*``; ``NAME`` or ``name `` are ignored); a bare
    word before ``=`` joins the next attribute's name (``flag; name=x`` has no name). A
    quoted value ends at the first unescaped quote and an unterminated one is empty; an
    unquoted value runs to the next ``;`` (unstripped) or, last, to the end (stripped).
    Filenames come back with whether they were quoted: a quoted value is built in a
    ``String.new``, so it is ASCII-8BIT whatever the buffer's encoding.
    """
    semicolon = disposition.find(b";")
    if semicolon < 0:
        raise _RubyError("NoMethodError", "undefined method `+' for nil:NilClass")
    rest = disposition[semicolon + 1 :]
    name: bytes | None = None
    filename: tuple[bytes, bool] | None = None
    filename_star: tuple[bytes, bool] | None = None
    count = 0
    while (equals := rest.find(b"=")) >= 0:
        count += 1
        if count > _DISPOSITION_MAX_PARAMS:
            break
        param = _ruby_lstrip(rest[:equals])
        rest = rest[equals + 1 :]
        quoted = rest[:1] == b'"'
        if quoted:
            rest = rest[1:]
            value = bytearray()
            while found := _QUOTE_OR_BACKSLASH.search(rest):
                char = rest[found.start() : found.start() + 1]
                value += rest[: found.start()]
                rest = rest[found.start() + 1 :]
                if char == b'"':
                    break
                state.escapes += 1
                if state.escapes > _QUOTED_ESCAPES_LIMIT:
                    raise _RubyError(
                        "Rack::Multipart::BoundaryTooLongError",
                        "number of quoted escapes during content disposition parsing exceeds limit",
                    )
                escaped, rest = rest[:1], rest[1:]
                if param == b"filename" and escaped != b'"':
                    value += b"\\" + escaped
                else:
                    value += escaped
            text = bytes(value)
        elif (semi := rest.find(b";")) >= 0:
            text, rest = rest[:semi], rest[semi:]
        else:
            text, rest = _ruby_strip(rest), b""
        if param == b"name":
            name = text
        elif param == b"filename":
            filename = (text, quoted)
        elif param == b"filename*":
            filename_star = (text, quoted)
        if (semi := rest.find(b";")) >= 0:
            rest = rest[semi + 1 :]
    return name, filename, filename_star


def _normalize_filename_3_1(filename: bytes, *, utf8: bool) -> bytes:
    """v3.1.22 parser.rb:534-542: percent-decode, scrub, then keep the last path segment."""
    parts = _ruby_split_re(_percent_decode_filename(filename, utf8=utf8), _SLASHES)
    return parts[-1] if parts else b""


def _head_3_1(raw_head: bytes, state: _HeadState, *, utf8: bool) -> _Part:
    """``handle_mime_head`` of Rack 3.1 (v3.1.22 parser.rb:365-490).

    Headers are anchored at line starts and may be folded. A Content-Disposition longer than
    1536 bytes is ignored *entirely* (name and filename), as is any without one: then the name
    is the Content-ID header's value, raw. ``filename*`` wins over ``filename``; both are
    percent-decoded and cut to their last ``/`` or ``\\`` segment before becoming a name.
    """
    ct_match = _CT_3_1.search(raw_head)
    content_type = _OBS_UNFOLD.sub(rb"\1", ct_match.group(1)) if ct_match else None
    name: bytes | None = None
    filename_raw = filename_star = None
    disposition = _DISPOSITION_3_1.search(raw_head)
    if disposition and len(disposition.group(1)) <= _DISPOSITION_MAX_BYTES:
        unfolded = _OBS_UNFOLD.sub(rb"\1", disposition.group(1))
        name, filename_raw, filename_star = _disposition_3_1(unfolded, state)
    else:
        content_id = _CONTENT_ID_3_1.search(raw_head)
        name = content_id.group(1) if content_id else None
    filename: _RStr | None = None
    if filename_star is not None:
        fields = _ruby_split_limit(filename_star[0], b"'", 3)
        charset = fields[0] if fields else None
        if charset is None:
            raise _RubyError("TypeError", "no implicit conversion of nil into String")
        enc = _charset(charset, "3.1")
        value = fields[2] if len(fields) > 2 else b""
        star_utf8 = utf8 and not filename_star[1] and len(fields) > 2
        filename = _RStr(_normalize_filename_3_1(value, utf8=star_utf8), _force_encoding(enc))
    elif filename_raw is not None:
        raw_utf8 = utf8 and not filename_raw[1]
        filename = _RStr(
            _normalize_filename_3_1(filename_raw[0], utf8=raw_utf8), _UTF8 if raw_utf8 else _BINARY
        )
    if not name:
        name = filename.data if filename is not None else (content_type or b"text/plain") + b"[]"
    return _Part(raw_head, name, filename, content_type)


def _extname(name: bytes) -> bytes:  # noqa: C901 - a port of Ruby's C loop
    """``File.extname`` on Linux (Ruby 3.1 file.c ruby_enc_find_extname)."""
    last = None
    i = 0
    while i < len(name):
        if name[i] == ord("/"):
            sep = i
            i += 1
            while i < len(name) and name[i] == ord("/"):
                i += 1
            if i >= len(name):
                break
            last = sep
        else:
            i += 1
    p = 0 if last is None else last + 1
    while p < len(name) and name[p] == ord("/"):
        p += 1
    start = p
    while p < len(name) and name[p] == ord("."):
        p += 1
    dot = None
    while p < len(name):
        if name[p] == ord("."):
            dot = p
        elif name[p] == ord("/"):
            break
        p += 1
    if dot is None or dot == start:
        return b""
    return b"." if dot + 1 == p else name[dot:p]


def _tempfile(line: str, filename: _RStr) -> None:
    """Raise where ``TEMPFILE_FACTORY`` raises (v2.2.24 parser.rb:15-19, v3.0.18 :49-51).

    The extension of the upload's name becomes the temporary file's suffix. 2.2 and 3.1 cut it
    to 129 characters; 3.0 does not, so a long extension of safe characters gives
    Errno::ENAMETOOLONG. Ruby's Dir::Tmpname keeps only ``[,\\-.0-9A-Za-z_~]`` of it, and
    raises for an extension that is not valid in its encoding.
    """
    if filename.kind == "incompat":
        raise _RubyError(
            "Encoding::CompatibilityError",
            f"incompatible character encodings: {filename.enc} and UTF-8",
        )
    ext = _RStr(_extname(filename.data.replace(b"\x00", b"%00")), filename.enc)
    if line != "3.0":
        ext = _RStr.from_view(ext.view()[:129], ext.enc)
    if ext.kind == "multi" and not ext.data.isascii():
        raise RackUnmodelled(f"temporary file suffix in {ext.enc}")
    if ext.broken():
        raise _RubyError("ArgumentError", f"invalid byte sequence in {ext.enc}")
    kept = sum(1 for b in ext.data if b in _TMPNAME_SAFE)
    # "RackMultipart" + YYYYMMDD + "-" + pid (1-7 digits) + "-" + 1-6 random base-36 digits.
    if 13 + 8 + 1 + 1 + 1 + 1 + kept > _NAME_MAX:
        raise _RubyError("Errno::ENAMETOOLONG", "File name too long")
    if 13 + 8 + 1 + 7 + 1 + 6 + kept > _NAME_MAX:
        raise RackUnmodelled("temporary file name within a few bytes of NAME_MAX")


class _MultipartParser:
    """``Rack::Multipart::Parser`` over a body Rack reads in one go (at most 1 MiB)."""

    def __init__(self, release: RackRelease, boundary: bytes, buf: bytes) -> None:
        self.release = release
        self.line = release.line
        self.boundary = boundary
        self.buf = buf
        self.pos = 0
        self.parts: list[_Part] = []
        self.files = 0
        self.state = _HeadState()
        self.utf8 = buf.isascii()
        dashed = re.escape(b"--" + boundary)
        self.at_pos_re = re.compile(dashed + rb"(?:\r\n|--)")
        if self.line == "2.2":
            # v2.2.24 parser.rb:237: the CRLF before the boundary is optional.
            self.body_re = re.compile(rb"(?:\r\n)?" + dashed + rb"(?:\r\n|--)")
        else:
            # v3.x parser.rb:215/256: CRLF before the boundary, or the scan position itself.
            self.body_re = re.compile(rb"\r\n" + dashed + rb"(?:\r\n|--)")

    def eof(self) -> _RubyError:
        return _RubyError(_EMPTY_CONTENT[self.line], "")

    def find_boundary(self, pos: int) -> tuple[int, int] | None:
        """Where the body regexp matches from ``pos``: (start, end)."""
        if self.line != "2.2":
            at_pos = self.at_pos_re.match(self.buf, pos)
            if at_pos:
                return at_pos.start(), at_pos.end()
        match = self.body_re.search(self.buf, pos)
        return (match.start(), match.end()) if match else None

    def consume_boundary(self) -> str | None:
        if self.line == "2.2":
            # v2.2.24 parser.rb:388-396: read line by line; a line that strips to the
            # boundary counts, whatever surrounds it (LF-only, leading spaces...).
            full = b"--" + self.boundary
            while True:
                newline = self.buf.find(b"\n", self.pos)
                end = len(self.buf) if newline < 0 else newline + 1
                line = self.buf[self.pos : end]
                self.pos = end
                stripped = _ruby_strip(line)
                if stripped == full:
                    return "BOUNDARY"
                if stripped == full + b"--":
                    return "END_BOUNDARY"
                if self.pos >= len(self.buf):
                    return None
        found = self.find_boundary(self.pos)
        if found is None:
            self.pos = len(self.buf)
            return None
        self.pos = found[1]
        return "BOUNDARY" if self.buf[found[1] - 2 : found[1]] == b"\r\n" else "END_BOUNDARY"

    def fast_forward(self) -> str:
        if self.line == "2.2":
            token = self.consume_boundary()
            if (
                token == "END_BOUNDARY"
                and self.pos == len(self.boundary) + 6
                and self.pos == len(self.buf)
            ):
                return "DONE"
            if token:
                return "MIME_HEAD"
            raise _RubyError("EOFError", "bad content body")
        while True:
            token = self.consume_boundary()
            if token == "BOUNDARY":
                return "MIME_HEAD"
            if token == "END_BOUNDARY":
                if self.pos == len(self.boundary) + 4 and self.buf[self.pos :] == b"\r\n":
                    return "DONE"
                continue
            if self.line == "3.1" and len(self.buf) > _BOUNDARY_START_LIMIT:
                raise _RubyError(
                    "Rack::Multipart::BoundaryTooLongError",
                    "multipart boundary not found within limit",
                )
            raise self.eof()

    def mime_head(self) -> None:
        end = self.buf.find(b"\r\n\r\n", self.pos)
        if end < 0:
            if self.line == "3.1" and len(self.buf) - self.pos > _MIME_HEADER_LIMIT:
                raise _RubyError(
                    "Rack::Multipart::BoundaryTooLongError", "multipart mime part header too large"
                )
            raise self.eof()
        raw_head = self.buf[self.pos : end + 2]
        self.pos = end + 4
        if self.line == "3.1":
            part = _head_3_1(raw_head, self.state, utf8=self.utf8)
        else:
            part = _head_old(self.release, raw_head, utf8=self.utf8)
        part.head_enc = _UTF8 if self.utf8 else _BINARY
        # Then on_mime_head: the temporary file, and the part limits (parser.rb:174-216).
        if part.filename is not None:
            _tempfile(self.line, part.filename)
            self.files += 1
        self.parts.append(part)
        if self.files >= _FILE_LIMIT:
            raise _RubyError(
                "Rack::Multipart::MultipartPartLimitError",
                "Maximum file multiparts in content reached",
            )
        if len(self.parts) >= _TOTAL_PART_LIMIT:
            raise _RubyError(
                "Rack::Multipart::MultipartTotalPartLimitError",
                "Maximum total multiparts in content reached",
            )

    def mime_body(self) -> None:
        found = self.find_boundary(self.pos)
        if found is None:
            raise self.eof()
        body = self.buf[self.pos : found[0]]
        self.parts[-1].body = body
        # "skip \r\n after the content": two bytes, whether or not a CRLF was there.
        self.pos += len(body) + 2

    def parse(self) -> list[_Part]:
        state = "FAST_FORWARD"
        while state != "DONE":
            if state == "FAST_FORWARD":
                state = self.fast_forward()
            elif state == "MIME_HEAD":
                self.mime_head()
                state = "MIME_BODY"
            elif state == "MIME_BODY":
                self.mime_body()
                state = "CONSUME_TOKEN"
            else:
                token = self.consume_boundary()
                at_end = self.pos >= len(self.buf)
                state = (
                    "DONE"
                    if token == "END_BOUNDARY" or (at_end and token != "BOUNDARY")
                    else "MIME_HEAD"
                )
        return self.parts


def _part_value(part: _Part, line: str) -> tuple[_RStr, _Value] | None:
    """``MimePart#get_data`` then ``tag_multipart_encoding`` (v2.2.24 parser.rb:130-149, 435-461).

    An upload with an empty filename yields nothing at all. Text parts whose Content-Type is
    exactly ``text/plain`` take the name's and value's encoding from its ``charset``; a
    parameter without ``=`` (or an empty Content-Type) raises NoMethodError; an unknown
    charset raises ArgumentError in 2.2 and means ASCII-8BIT in 3.x (v3.1.22 parser.rb:580-584).
    """
    if part.filename is not None and part.filename.data == b"":
        return None
    if part.filename is not None:
        part.filename.check_regexp()
        segments = _ruby_split_re(part.filename.data, _SLASHES)
        basename = _RStr(segments[-1], part.filename.enc) if segments else None
        upload = _Upload(basename, part.content_type, part.name, part.head, part.head_enc)
        return _RStr(part.name, _UTF8), upload
    encoding: str | None = _UTF8
    if part.content_type is not None:
        fields = _ruby_split(part.content_type, b";")
        if not fields:
            raise _RubyError("NoMethodError", "undefined method `strip!' for nil:NilClass")
        if _ruby_strip(fields[0]) == b"text/plain":
            for param in fields[1:]:
                pieces = _ruby_split_limit(param, b"=", 2)
                if len(pieces) < 2:
                    raise _RubyError("NoMethodError", "undefined method `strip!' for nil:NilClass")
                key, val = _ruby_strip(pieces[0]), _ruby_strip(pieces[1])
                if val.startswith(b'"') and val.endswith(b'"'):
                    val = val[1:-1]
                if key == b"charset":
                    encoding = _charset(val, line)
    enc = _force_encoding(encoding)
    return _RStr(part.name, enc), _Text(part.body, enc)


def _charset(name: bytes, line: str) -> str | None:
    try:
        return _encoding_find(name)
    except _RubyError as exc:
        if line == "2.2" or exc.cls != "ArgumentError":
            raise
        return _BINARY


def _multipart(  # noqa: C901 - the three releases' orderings side by side
    release: RackRelease, content_type: bytes | None, body: bytes
) -> tuple[_Params, list[ParamName]] | None:
    """``Parser.parse`` + ``#result``; None where Rack returns no params (EMPTY)."""
    if not body:  # CONTENT_LENGTH 0: EMPTY before the boundary is looked at.
        return None
    boundary = _boundary(release, content_type)
    if boundary is None:
        return None
    if release.line != "2.2" and len(boundary) > 70:
        cls = (
            "Rack::Multipart::Error"
            if release.line == "3.0"
            else "Rack::Multipart::BoundaryTooLongError"
        )
        raise _RubyError(cls, f"multipart boundary size too large ({len(boundary)} characters)")
    if len(body) > _BUFSIZE:
        raise RackUnmodelled("multipart body larger than Rack's 1 MiB read buffer")
    parts = _MultipartParser(release, boundary, body).parse()
    norm = _Normaliser(release.line)
    params = norm.make_params()
    names: list[ParamName] = []
    pairs: list[tuple[_RStr, _Value]] = []
    for part in parts:
        pair = _part_value(part, release.line)
        if pair is None:
            continue
        if release.line != "3.1":
            norm.normalize(params, pair[0], pair[1])  # 2.2/3.0 normalise part by part
        pairs.append(pair)
    if release.line == "3.1":
        for name, value in pairs:  # 3.1 collects pairs, then Request#POST expands them
            norm.normalize(params, name, value)
    for name, value in pairs:
        text = value.data.decode("utf-8", "surrogateescape") if isinstance(value, _Text) else None
        names.append(
            ParamName(
                raw=name.text,
                top=norm.top_key(name),
                source="multipart",
                value=text,
                is_file=isinstance(value, _Upload),
                encoding=name.enc,
            )
        )
    return params, names


def multipart_names(
    release: RackRelease, content_type: str | bytes | None, body: bytes
) -> list[ParamName] | None:
    """The names Rack's multipart parser reads from ``body``, in order.

    Returns None where Rack's parser gives no result: an empty body, or a Content-Type with no
    boundary Rack can find (v2.2.24 parser.rb:103-107). For a form media type Rack then reads
    the *same body as urlencoded* (see :func:`read_request`). Raises :class:`RackRefused`
    where this release raises, :class:`RackUnmodelled` for bodies over 1 MiB.
    """
    ct = None if content_type is None else _as_bytes(content_type)
    try:
        result = _multipart(release, ct, body)
    except _RubyError as exc:
        raise RackRefused((("POST", exc.cls, exc.message),)) from exc
    return None if result is None else result[1]


# --------------------------------------------------------------------------------------------
# Rack::Request#POST, Rack::MethodOverride and the whole request.
# --------------------------------------------------------------------------------------------

_FORM_MEDIA_TYPES: Final = frozenset({b"application/x-www-form-urlencoded", b"multipart/form-data"})
_PARSEABLE_MEDIA_TYPES: Final = frozenset({b"multipart/related", b"multipart/mixed"})
_HTTP_METHODS: Final = frozenset(
    {"GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH", "LINK", "UNLINK"}
)
_OVERRIDE_RESCUES: Final = frozenset(
    {
        "Rack::QueryParser::InvalidParameterError",
        "Rack::QueryParser::ParameterTypeError",
        "Rack::QueryParser::QueryLimitError",
        "EOFError",
        "Rack::Multipart::EmptyContentError",
    }
)
_MEDIA_SPLIT: Final = re.compile(rb"[;,]")


def _media_type(content_type: bytes | None) -> bytes | None:
    """``MediaType.type`` (lib/rack/media_type.rb:16-23): before ``;`` or ``,``, rstripped,
    downcased. An empty CONTENT_TYPE counts as none (request.rb ``content_type``).
    """
    if not content_type:
        return None
    return _MEDIA_SPLIT.split(content_type, maxsplit=1)[0].rstrip(_RUBY_WHITESPACE).lower()


def _is_form(content_type: bytes | None, method: str) -> bool:
    """``form_data? || parseable_data?`` (v2.2.24 request.rb:412-423, same in 3.0 and 3.1).

    A POST with no (or an empty) Content-Type is a form in *every* release.
    """
    media = _media_type(content_type)
    if media is None:
        return method == "POST"
    return media in _FORM_MEDIA_TYPES or media in _PARSEABLE_MEDIA_TYPES


def _post(
    release: RackRelease, content_type: bytes | None, body: bytes, method: str
) -> tuple[_Params, list[ParamName]]:
    """``Rack::Request#POST`` (v2.2.24 request.rb:440-466, v3.0.18 :498-540, v3.1.22 :503-555;
    3.1 expands the multipart pairs in ``expand_param_pairs``, :687-695).

    Multipart first; where that yields nothing (no boundary, empty body) the body is parsed
    as urlencoded, whatever the form media type said: ``multipart/form-data`` with no
    boundary and a body of ``_method=PUT`` is read as ``_method``.
    """
    if not _is_form(content_type, method):
        return _Normaliser(release.line).make_params(), []
    result = _multipart(release, content_type, body)
    if result is not None:
        return result
    return _urlencoded(release, body)


def _override_method(value: _Value, header: bytes | None) -> str | None:
    """``MethodOverride#method_override`` (v2.2.24 method_override.rb:27-36)."""
    if isinstance(value, _Text):
        return _ruby_upcase(value)
    if value is not None:
        return None  # a Hash or an Array: its #to_s is never a method name
    if header is None:
        return None
    return header.upper().decode("latin-1")


def _ruby_upcase(value: _Text) -> str | None:
    """``String#upcase`` (Unicode-aware for UTF-8, so ``po\\u017ft`` is ``POST``); None where it
    raises (the override then does nothing).
    """
    s = _RStr(value.data, value.enc)
    if s.kind == "utf8":
        return None if s.broken() else s.data.decode("utf-8").upper()
    if s.data.isascii() and s.kind != "incompat":
        return s.data.upper().decode("ascii")
    if s.kind == "binary":
        return s.data.upper().decode("latin-1")
    raise RackUnmodelled(f"upcase of non-ASCII {s.enc} text")


def read_request(
    release: RackRelease,
    *,
    method: str = "POST",
    content_type: str | bytes | None = None,
    query: str | bytes = "",
    body: bytes = b"",
    method_override_header: str | bytes | None = None,
) -> RackReading:
    """What ``release`` makes of a request: ``Rack::MethodOverride``, then ``#GET``/``#POST``.

    ``method_override_header`` is ``X-HTTP-Method-Override``; Content-Length is the body's
    length. The override applies to POSTs only and reads ``_method`` from the *body* alone
    (``req.POST``; never the query string), falling back to the header when the body has no
    ``_method`` or fails to parse (v2.2.24 method_override.rb:15-50, v3.1.22 :19-54). Raises
    :class:`RackRefused` where the release raises, :class:`RackUnmodelled` where the model
    cannot tell.
    """
    ct = None if content_type is None else _as_bytes(content_type)
    header = None if method_override_header is None else _as_bytes(method_override_header)
    errors: list[tuple[str, str, str]] = []
    post_result: tuple[_Params, list[ParamName]] | None = None
    post_error: _RubyError | None = None
    try:
        post_result = _post(release, ct, body, method)
    except _RubyError as exc:
        post_error = exc
    final_method, original = method, None
    if method == "POST":
        if post_error is not None and post_error.cls not in _OVERRIDE_RESCUES:
            raise RackRefused((("method_override", post_error.cls, post_error.message),))
        value = post_result[0].get(_RStr(b"_method")) if post_result else None
        override = _override_method(value, header)
        if override in _HTTP_METHODS and override is not None:
            final_method, original = override, method
    seps = b"&;" if release.line == "2.2" else b"&"
    get_result: tuple[_Params, list[ParamName]] | None = None
    try:
        get_result = _parse_nested_query(release.line, _as_bytes(query), seps, "query")
    except _RubyError as exc:
        errors.append(("GET", exc.cls, exc.message))
    if post_error is not None:
        errors.append(("POST", post_error.cls, post_error.message))
    if errors or get_result is None or post_result is None:
        raise RackRefused(tuple(errors))
    merged = get_result[0].merged(post_result[0])
    return RackReading(
        release=release,
        method=final_method,
        original_method=original,
        get=tuple(get_result[1]),
        post=tuple(post_result[1]),
        keys=tuple(tuple(_path_key(p) for p in path) for path in _paths(merged)),
        params=_render(merged),
        get_tree=_render(get_result[0]),
        post_tree=_render(post_result[0]),
    )


def all_readings(
    *,
    method: str = "POST",
    content_type: str | bytes | None = None,
    query: str | bytes = "",
    body: bytes = b"",
    method_override_header: str | bytes | None = None,
    releases: tuple[RackRelease, ...] = RELEASES,
) -> dict[RackRelease, RackReading | RackRefused | RackUnmodelled]:
    """:func:`read_request` under every release: its reading, or the exception it raised."""
    out: dict[RackRelease, RackReading | RackRefused | RackUnmodelled] = {}
    for release in releases:
        try:
            out[release] = read_request(
                release,
                method=method,
                content_type=content_type,
                query=query,
                body=body,
                method_override_header=method_override_header,
            )
        except (RackRefused, RackUnmodelled) as exc:
            out[release] = exc
    return out


# --------------------------------------------------------------------------------------------
# Rendering, in rack_replay.rb's JSON shapes.
# --------------------------------------------------------------------------------------------


def _text(data: bytes | None) -> object:
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"hex": data.hex()}


def _key_json(key: _RStr) -> object:
    if key.enc == _UTF8:
        return _text(key.data)
    return {"k": _text(key.data), "enc": key.enc}


def _render(value: _Value) -> object:
    if value is None:
        return None
    if isinstance(value, _Text):
        return {"s": _text(value.data), "enc": value.enc}
    if isinstance(value, _Upload):
        filename = None if value.filename is None else value.filename.data
        return {
            "f": {"filename": _text(filename), "type": _text(value.type), "name": _text(value.name)}
        }
    if isinstance(value, _UploadPairs):
        up = value.upload
        fn = None if up.filename is None else {"s": _text(up.filename.data), "enc": up.filename.enc}
        ct = None if up.type is None else {"s": _text(up.type), "enc": up.head_enc}
        pairs: list[tuple[str, object]] = [
            ("filename", fn),
            ("type", ct),
            ("name", {"s": _text(up.name), "enc": _UTF8}),
            ("tempfile", {"o": "Tempfile"}),
            ("head", {"s": _text(up.head), "enc": up.head_enc}),
        ]
        return {"a": [{"a": [{"y": k}, v]} for k, v in pairs]}
    if isinstance(value, list):
        return {"a": [_render(v) for v in value]}
    return {"h": [[_key_json(k), _render(v)] for k, v in value.items.values()]}


def _paths(
    value: _Value, prefix: tuple[_RStr | int, ...] = ()
) -> Iterator[tuple[_RStr | int, ...]]:
    if isinstance(value, _Params):
        for key, child in value.items.values():
            path = (*prefix, key)
            yield path
            yield from _paths(child, path)
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, (*prefix, index))


def _path_key(part: _RStr | int) -> str | int:
    return part if isinstance(part, int) else part.text


def replay_paths(reading: RackReading) -> list[list[object]]:
    """``reading.keys`` in rack_replay.rb's JSON shape (keys rendered as the replay does)."""
    return _json_paths(reading.params)


def _json_paths(tree: object, prefix: tuple[object, ...] = ()) -> list[list[object]]:
    out: list[list[object]] = []
    if isinstance(tree, dict) and "h" in tree:
        for key, child in tree["h"]:
            path = (*prefix, key)
            out.append(list(path))
            out.extend(_json_paths(child, path))
    elif isinstance(tree, dict) and "a" in tree:
        for index, child in enumerate(tree["a"]):
            out.extend(_json_paths(child, (*prefix, index)))
    return out


def replay_request(
    *,
    method: str = "POST",
    content_type: str | bytes | None = None,
    query: str | bytes = "",
    body: bytes = b"",
    method_override_header: str | bytes | None = None,
) -> dict[str, object]:
    """The JSON request description tests/support/rack_replay.rb reads, for the same inputs."""
    out: dict[str, object] = {
        "method": method,
        "body_base64": base64.b64encode(body).decode("ascii"),
    }
    fields = {
        "content_type": content_type,
        "query": query,
        "method_override_header": method_override_header,
    }
    for name, value in fields.items():
        if value is None:
            out[name] = None
        else:
            out[f"{name}_base64"] = base64.b64encode(_as_bytes(value)).decode("ascii")
    return out
