"""Subscriber tokens as a test forges them: signed with any key and algorithm, or unsigned."""

from __future__ import annotations

import base64
import json
import warnings
from typing import Any

import jwt


def forge(claims: dict[str, Any], key: Any, alg: str = "HS256") -> str:
    """A JWT of `claims` signed with `key` (short test keys allowed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        return jwt.encode(claims, key, algorithm=alg)


def b64(obj: dict[str, Any]) -> str:
    """One JWT segment: JSON, base64url without padding."""
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def unsigned(claims: dict[str, Any]) -> str:
    """An `alg: none` token, built by hand as an attacker would."""
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."
