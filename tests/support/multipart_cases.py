"""Generated multipart/form-data requests, innocent and hostile, for the Rack-reading tests.

Built from the ways Rack 2.2, 3.0 and 3.1 read part names (docs/proxy-rules.md#multipart-bodies):
header names in any case, decoys inside other headers, Content-ID, file names standing in for
names, parameter lists Rack 3.1 stops reading, loose boundaries and loose framing. Driven by a
``random.Random`` so hypothesis (``st.randoms()``) and a seeded sample share one generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import random

NAMES = [
    "a",
    "assignment[name]",
    "file",
    "as_user_id",
    "_method",
    "me",
    "become_user_id",
    "access_token",
    "[as_user_id]",
    "as_user_id]",
    "x[as_user_id]",
    "x; name=as_user_id",
    "%61s_user_id",
    "a b",
    "include[]",
    "caf\u00e9",
    "",
]
INNOCENT = ["a", "assignment[name]", "file", "a b", "caf\u00e9", "x[y][]", "as%5Fuser%5Fid"]
FILENAMES = ["report.pdf", "as_user_id", "x/as_user_id", "%61s_user_id", "", "a:b", "r\u00e9.txt"]
BOUNDARIES = ["b", "----WebKitFormBoundary7MA4YWxkTrZu0gW", "AaB03x", "x-boundary-y"]
VALUES = [b"v", b"uuid", b"rubric", b"", b"DELETE", b'{"as_user_id": 1}']


@dataclass(frozen=True)
class Case:
    """A request body and its Content-Type."""

    content_type: str
    body: bytes


def _quoted(rng: random.Random, value: str) -> str:
    return value if rng.random() < 0.2 and value and " " not in value else f'"{value}"'


def _disposition(rng: random.Random) -> str:
    header = rng.choice(["Content-Disposition", "content-disposition", "CONTENT-DISPOSITION"])
    colon = rng.choice([": ", ": ", ": ", ":", ":  "])
    kind = rng.choice(["form-data", "form-data", "FORM-DATA", "attachment"])
    params: list[str] = []
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 17])):
        choice = rng.random()
        if choice < 0.6:
            key = rng.choice(["name", "name", "name", "NAME", "Name"])
            params.append(f"{key}={_quoted(rng, rng.choice(NAMES))}")
        elif choice < 0.85:
            key = rng.choice(["filename", "filename", "filename*", "FILENAME"])
            value = rng.choice(FILENAMES)
            params.append(
                f"{key}=UTF-8''{value}" if key == "filename*" else f"{key}={_quoted(rng, value)}"
            )
        else:
            params.append(rng.choice(["flag", "foo=1", 'foo="; name=as_user_id"']))
    separator = rng.choice(["; ", "; ", ";", " ; "])
    padding = "" if rng.random() < 0.95 else '; pad="' + "x" * 1600 + '"'
    return f"{header}{colon}{kind}{separator}{separator.join(params)}{padding}"


def _other_header(rng: random.Random) -> str:
    return rng.choice(
        [
            "Content-Type: text/plain",
            "Content-Type: application/pdf",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Type: text/plain; charset=UTF-16LE",
            "Content-Type: text/plain; foo",
            "Content-Type: as_user_id",
            "Content-Type:text/plain",
            "Content-Type: text/plain; filename=as_user_id",
            "Content-ID: as_user_id",
            "Content-ID:",
            "Content-Transfer-Encoding: binary",
            "X-Note: Content-Disposition: form-data; name=as_user_id",
            "X-Note: a",
            " folded-continuation",
        ]
    )


def _clean_head(rng: random.Random) -> str:
    name = rng.choice(INNOCENT if rng.random() < 0.8 else NAMES)
    head = f'Content-Disposition: form-data; name="{name}"'
    if rng.random() < 0.3:
        head += f'; filename="{rng.choice(FILENAMES)}"'
    lines = [head]
    if rng.random() < 0.3:
        lines.append(rng.choice(["Content-Type: application/pdf", "Content-Type: text/plain"]))
    if rng.random() < 0.25:
        # One stray header beside a clean disposition: decoys, Content-ID, odd types.
        lines.insert(rng.randrange(len(lines) + 1), _other_header(rng))
    return "\r\n".join(lines)


def _head(rng: random.Random) -> str:
    if rng.random() < 0.8:
        return _clean_head(rng)
    lines = [_disposition(rng)] if rng.random() < 0.9 else []
    for _ in range(rng.choice([0, 0, 0, 1, 1, 2])):
        lines.insert(rng.randrange(len(lines) + 1), _other_header(rng))
    eol = "\r\n" if rng.random() < 0.95 else "\n"
    return eol.join(lines)


def _content_type(rng: random.Random, boundary: str) -> str:
    if rng.random() < 0.8:
        return f"multipart/form-data; boundary={boundary}"
    return rng.choice(
        [
            f"multipart/form-data; boundary={boundary}",
            f'multipart/form-data; boundary="{boundary}"',
            f"Multipart/Form-Data; BOUNDARY={boundary}",
            f"multipart/form-data;boundary={boundary}; charset=utf-8",
            f"multipart/form-data; xboundary=zz; boundary={boundary}",
            f'multipart/form-data; boundary={boundary}; x="boundary=zz"',
            f"multipart/form-data; boundary ={boundary}",
            "multipart/form-data",
            f"multipart/mixed; boundary={boundary}",
        ]
    )


def random_case(rng: random.Random) -> Case:
    """One generated request: mostly well-formed parts, with a trap or two mixed in."""
    boundary = rng.choice(BOUNDARIES)
    delimiter = f"--{boundary}".encode()
    body = b"preamble\r\n" if rng.random() < 0.03 else b""
    for _ in range(rng.randint(1, 3)):
        opening = delimiter + rng.choice([b"\r\n"] * 20 + [b"\n", b"  \r\n"])
        content = rng.choice(VALUES)
        body += opening + _head(rng).encode() + b"\r\n\r\n" + content + b"\r\n"
    closing = rng.random()
    if closing < 0.9:
        body += delimiter + b"--\r\n"
    elif closing < 0.95:
        body += delimiter + b"--\r\n" + delimiter + b"\r\n" + _head(rng).encode() + b"\r\n\r\nx\r\n"
    return Case(_content_type(rng, boundary), body)
