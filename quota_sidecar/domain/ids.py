"""Validation of identifiers that become part of Redis keys and records."""

from __future__ import annotations

import re
import uuid

from quota_sidecar.domain.errors import InvalidArgument

MAX_ID_CHARS = 128
# No braces (they would break the cluster hash tag), no '|' (free-field separator),
# nothing a terminal or log line could misrender.
_ID = re.compile(r"[A-Za-z0-9._:@+=/-]{1,128}")


def check_id(field: str, value: str) -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    if len(value) > MAX_ID_CHARS:
        raise InvalidArgument(field, f"is {len(value)} characters long; at most {MAX_ID_CHARS} allowed")
    if not _ID.fullmatch(value):
        raise InvalidArgument(field, "may only contain letters, digits and . _ : @ + = / -")
    return value


def new_reservation_id() -> str:
    return "r-" + uuid.uuid4().hex
