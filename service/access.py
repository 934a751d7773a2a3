"""The bearer key of a request, checked for shape and checksum before the database sees it.

The database decides whether a key is live and what it may do (bps.key_access); this only turns away, with
no lookup, what cannot be a key: 'bps_', 32 random base62 characters, then 6 of checksum (base62 of the
first 4 bytes of the sha256 of what precedes them), as bps.create_api_key makes them.
"""

from __future__ import annotations

import hashlib
import re

KEY_SHAPE = re.compile(r"bps_[0-9A-Za-z]{38}")
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
BODY_LENGTH = 36  # 'bps_' and the random part


def base62(n: int, width: int) -> str:
    digits = []
    for _ in range(width):
        n, digit = divmod(n, 62)
        digits.append(BASE62[digit])
    return "".join(reversed(digits))


def checksum(body: str) -> str:
    return base62(int.from_bytes(hashlib.sha256(body.encode()).digest()[:4], "big"), 6)


def is_well_formed(key: str) -> bool:
    """True when `key` has a key's shape and its checksum is right (a typo almost never keeps both)."""
    return KEY_SHAPE.fullmatch(key) is not None and checksum(key[:BODY_LENGTH]) == key[BODY_LENGTH:]


def bearer_key(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header (the scheme in any case), or None when the header
    is absent, of another scheme, or holds something that cannot be a key."""
    if authorization is None:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not is_well_formed(key):
        return None
    return key
