"""JSON at the store boundary: orjson when installed (several times faster), the stdlib otherwise.

Everything dsm writes to a store goes through here. Payloads are checked separately
(dsm.payloads) before they get this far, so NaN or non-string keys never reach `dumps`.
"""

from __future__ import annotations

import json
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a dependency; the fallback keeps dsm importable
    orjson = None  # type: ignore[assignment]


_STDLIB_MARK = (b" ", " ")

if orjson is not None:
    def dumps_strict(value: Any) -> bytes:
        """Raise TypeError for what the fast encoder cannot write (callers explain or fall back)."""
        return orjson.dumps(value)

    def dumps(value: Any) -> bytes:
        try:
            return orjson.dumps(value)
        except TypeError:
            # Integers beyond 64 bits, which payloads may hold: the stdlib writes any size, and the
            # leading space (still plain JSON) tells `loads` to read it back with the stdlib too,
            # since orjson would turn those integers into floats.
            return b" " + json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()

    def loads(raw: bytes | str) -> Any:
        if raw[:1] in _STDLIB_MARK:
            return json.loads(raw)
        return orjson.loads(raw)
else:
    def dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()

    dumps_strict = dumps

    def loads(raw: bytes | str) -> Any:
        return json.loads(raw)
