"""Versioned plain data: what schemes and configs serialize to, and the checks on reading it back.

A record is a frozen dataclass's fields as plain Python values (ready for JSON or a
checkpoint) under a "version" key. The version lets a later edgequant read an older
record, and an older edgequant refuse a newer one instead of misreading it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .errors import UsageError

VERSION_KEY = "version"


def record(version: int, fields: Mapping[str, Any]) -> dict[str, Any]:
    """`fields` under a version key: what a `to_dict()` returns."""
    return {VERSION_KEY: version, **fields}


def record_fields(data: object, kind: type, version: int) -> dict[str, Any]:
    """The fields of a record of dataclass `kind`, refusing one this edgequant cannot read.

    Fields the record lacks are left out, so the dataclass defaults apply; a newer
    version or a field `kind` does not have is an error, never silently dropped.
    """
    name = kind.__name__
    if not isinstance(data, Mapping):
        raise UsageError(f"{name}.from_dict takes a dict as {name}.to_dict() writes it, got {type(data).__name__}")
    found = data.get(VERSION_KEY)
    if type(found) is not int or found < 1:
        raise UsageError(
            f"{name} data needs an integer {VERSION_KEY!r} >= 1, as {name}.to_dict() writes; got {found!r}"
        )
    if found > version:
        raise UsageError(
            f"{name} data has version {found}, newer than this edgequant reads (up to {version}); upgrade edgequant"
        )
    known = [f.name for f in dataclasses.fields(kind)]
    unknown = [key for key in data if key != VERSION_KEY and key not in known]
    if unknown:
        raise UsageError(f"{name} has no field {', '.join(map(repr, unknown))}; its fields are {', '.join(known)}")
    return {key: value for key, value in data.items() if key != VERSION_KEY}
