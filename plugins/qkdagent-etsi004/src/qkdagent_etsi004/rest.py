"""qkd-module's REST form of 004 (REFERENCE §2.6): bodies and answers, both directions. Pure.

The module (`QKDModule.py`, Flask, plain HTTP) takes `POST /open_connect`, `/get_key`, `/close`,
`/available_keys` whose bodies are the Python `repr()` of a list, and answers with another repr:

    open_connect  [source, destination, {'timeout': ms, 'length': bits}, ksid_or_None]
                  -> ['<uuid>', 0] (HTTP 200) | ['<ksid or None>', 2] (HTTP 400)
    get_key       [ksid, index_or_-1, None]
                  -> [bytearray(b'...'), index, 0] (200) | [None, index_or_-1, 1] (400)
    close         [ksid]  -> 0 (200) | 2 (400)
    available_keys        -> [count]

The module `eval()`s what it receives and its key answer is `bytearray(b'...')`, which is not a
literal `ast.literal_eval` accepts. `parse_literal` therefore walks the syntax tree itself and
accepts only constants (str, bytes, int, bool, None), negative ints, lists, tuples, dicts with
string keys and that one call form, `bytearray(<bytes constant>)`: nothing is ever evaluated.
Bodies are bounded before parsing and nesting is bounded while walking.
"""

from __future__ import annotations

import ast
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

MAX_BODY = 64 * 1024
MAX_BODY_PIECES = 4096
"""Reads (h11 `Data` events) a request or answer body may come in: one of one-byte chunks
costs about 5 us a piece to parse, where an honest one arrives in a few."""
MAX_DEPTH = 4
MAX_ITEMS = 16
MAX_INT = 1 << 63
MAX_TEXT = 1024

PATHS = ("/open_connect", "/get_key", "/close", "/available_keys")

# the module's own (older) status numbering
SUCCESSFUL = 0
INSUFFICIENT_KEY = 1
NO_QKD_CONNECTION = 2
HANDLE_IN_USE = 3
TIMEOUT = 4


class LiteralError(ValueError):
    """A body that is not the expected literal (the message never quotes key bytes)."""


def parse_literal(data: bytes) -> Any:
    """The value of a Python literal, without evaluating anything (see the module docstring)."""
    if len(data) > MAX_BODY:
        raise LiteralError(f"body of {len(data)} bytes exceeds {MAX_BODY}")
    try:
        with warnings.catch_warnings():  # a module's odd literal is not our code to lint
            warnings.simplefilter("ignore", SyntaxWarning)  # e.g. "invalid decimal literal"
            warnings.simplefilter("ignore", DeprecationWarning)  # e.g. "invalid escape"
            tree = ast.parse(data.decode("utf-8").strip(), mode="eval")
    except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
        raise LiteralError("not a Python literal") from None
    return _value(tree.body, 0)


def _value(node: ast.AST, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise LiteralError("literal nested too deeply")
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, (str, bytes, bool)):
            return value
        if isinstance(value, int):
            return _int(value)
        raise LiteralError(f"constant of type {type(value).__name__} refused")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        operand = node.operand
        if isinstance(operand, ast.Constant) and type(operand.value) is int:
            return _int(-operand.value)
        raise LiteralError("only integers may be negated")
    if isinstance(node, (ast.List, ast.Tuple)):
        if len(node.elts) > MAX_ITEMS:
            raise LiteralError("list too long")
        return [_value(item, depth + 1) for item in node.elts]
    if isinstance(node, ast.Dict):
        if len(node.keys) > MAX_ITEMS:
            raise LiteralError("dict too long")
        result: dict[str, Any] = {}
        for key, item in zip(node.keys, node.values, strict=True):
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                raise LiteralError("dict keys must be strings")
            result[key.value] = _value(item, depth + 1)
        return result
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "bytearray"
        and len(node.args) == 1
        and not node.keywords
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, bytes)
    ):
        return node.args[0].value
    raise LiteralError(f"{type(node).__name__} is not a literal")


def _int(value: int) -> int:
    if not -MAX_INT <= value < MAX_INT:
        raise LiteralError("integer out of range")
    return value


def _list(data: bytes, length: int, what: str) -> list[Any]:
    value = parse_literal(data)
    if not isinstance(value, list) or len(value) != length:
        raise LiteralError(f"{what}: expected a list of {length} items")
    return value


def _int_field(value: Any, what: str) -> int:
    if type(value) is not int:
        raise LiteralError(f"{what} is not an integer")
    return value


def _ksid(value: Any, what: str) -> str:
    """A KSID as the module writes it: canonical UUID text."""
    if not isinstance(value, str) or len(value) != 36:
        raise LiteralError(f"{what}: Key_stream_ID is not UUID text")
    try:
        canonical = str(uuid.UUID(value))
    except ValueError:
        raise LiteralError(f"{what}: Key_stream_ID is not UUID text") from None
    if canonical != value:
        raise LiteralError(f"{what}: Key_stream_ID is not canonical UUID text")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT or not value.isprintable():
        raise LiteralError(f"{what} is not a printable string of at most {MAX_TEXT} characters")
    return value


# -- requests (the application's side writes, the module's side reads) -----------------------


@dataclass(frozen=True)
class OpenRequest:
    source: str
    destination: str
    timeout: int
    """milliseconds"""
    length: int
    """bits"""
    ksid: str | None


@dataclass(frozen=True)
class GetKeyRequest:
    ksid: str
    index: int
    """-1: the first available key"""


def encode_open(request: OpenRequest) -> bytes:
    qos = {"timeout": request.timeout, "length": request.length}
    return repr([request.source, request.destination, qos, request.ksid]).encode()


def encode_get_key(request: GetKeyRequest) -> bytes:
    return repr([request.ksid, request.index, None]).encode()


def encode_close(ksid: str) -> bytes:
    return repr([ksid]).encode()


def decode_open(data: bytes) -> OpenRequest:
    source, destination, qos, ksid = _list(data, 4, "open_connect")
    if not isinstance(qos, dict):
        raise LiteralError("open_connect: qos is not a dict")
    timeout = _int_field(qos.get("timeout"), "qos timeout")
    length = _int_field(qos.get("length"), "qos length")
    return OpenRequest(
        _text(source, "source"),
        _text(destination, "destination"),
        timeout,
        length,
        None if ksid is None else _ksid(ksid, "open_connect"),
    )


def decode_get_key(data: bytes) -> GetKeyRequest:
    ksid, index, _metadata = _list(data, 3, "get_key")
    return GetKeyRequest(_ksid(ksid, "get_key"), _int_field(index, "index"))


def decode_close(data: bytes) -> str:
    (ksid,) = _list(data, 1, "close")
    return _ksid(ksid, "close")


# -- answers (the module writes, the application reads) ---------------------------------------


@dataclass(frozen=True)
class OpenAnswer:
    ksid: str | None
    status: int


@dataclass(frozen=True)
class KeyAnswer:
    key: bytes | None = field(repr=False)
    index: int
    status: int


def answer_open(answer: OpenAnswer) -> bytes:
    """As the module writes it: `str(ksid)`, so a missing KSID is the text 'None'."""
    return repr([str(answer.ksid), answer.status]).encode()


def answer_get_key(answer: KeyAnswer) -> bytes:
    key = None if answer.key is None else bytearray(answer.key)
    return repr([key, answer.index, answer.status]).encode()


def answer_close(status: int) -> bytes:
    return str(status).encode()


def answer_available(count: int) -> bytes:
    return repr([count]).encode()


def read_open(data: bytes) -> OpenAnswer:
    ksid, status = _list(data, 2, "open_connect answer")
    status = _int_field(status, "status")
    if ksid == "None" or (ksid is None and status != SUCCESSFUL):
        return OpenAnswer(None, status)
    return OpenAnswer(_ksid(ksid, "open_connect answer"), status)


def read_get_key(data: bytes, *, max_key: int) -> KeyAnswer:
    key, index, status = _list(data, 3, "get_key answer")
    if key is not None and not isinstance(key, bytes):
        raise LiteralError("get_key answer: the key is not bytes")
    if key is not None and len(key) > max_key:
        raise LiteralError(f"get_key answer: key of {len(key)} bytes exceeds {max_key}")
    return KeyAnswer(key, _int_field(index, "index"), _int_field(status, "status"))


def read_close(data: bytes) -> int:
    return _int_field(parse_literal(data), "close answer")


def read_available(data: bytes) -> int:
    (count,) = _list(data, 1, "available_keys answer")
    return _int_field(count, "count")
