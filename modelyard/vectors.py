"""An embedding vector as float32 values in one buffer, from the reply to the Parquet column.

vLLM answers ``encoding_format: base64`` with little-endian float32 (the OpenAI API's
definition), and the output column is a fixed-size list of float32. A ``Vector`` keeps those
bytes as they came: decoding a reply, storing it in the request cache and building the column
are each one copy of a buffer, instead of a Python float object per value (a list of 384 floats
cost about as much per row as the whole HTTP exchange of a batched request).

It behaves as the float list a ``float`` reply holds where the product meets it: ``len``,
indexing and iteration give Python floats, it equals a list of the same values, and ``str``
shows it as that list (a template that prints an embedding sees what it saw before).
"""

from __future__ import annotations

import array
import binascii
import sys
from typing import Any

try:  # SIMD base64 (the library vLLM's server encodes with): 0.5 us a 384-float vector, binascii 2.6
    from pybase64 import b64decode as _b64decode

    def _decode(text: str) -> bytes:
        return _b64decode(text, validate=True)
except ImportError:  # pragma: no cover - a platform without its wheel
    _decode = binascii.a2b_base64

_BIG = sys.byteorder == "big"


class Vector(array.array):
    """float32 values (see the module doc). ``Vector(data)``: bytes of little-endian float32, or numbers."""

    def __new__(cls, data: Any = b"") -> "Vector":
        v = super().__new__(cls, "f", data)
        if _BIG and isinstance(data, (bytes, bytearray, memoryview)):
            v.byteswap()
        return v

    @classmethod
    def from_base64(cls, text: str) -> "Vector":
        return cls(_decode(text))

    def le_bytes(self) -> bytes:
        """The values as little-endian float32 bytes (what ``Vector(data)`` reads back)."""
        if not _BIG:
            return self.tobytes()
        c = array.array("f", self)
        c.byteswap()
        return c.tobytes()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, list):
            return self.tolist() == other
        return super().__eq__(other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None  # type: ignore[assignment]  (mutable, like a list)

    def __str__(self) -> str:
        return str(self.tolist())

    def __repr__(self) -> str:
        return f"Vector({self.tolist()})"

    def __reduce__(self):  # pickles as its bytes (array's own reduce calls cls(typecode, ...))
        return (Vector, (self.le_bytes(),))
