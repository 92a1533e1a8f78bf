"""API keys and the tenants they stand for: a name for metrics and logs (never the key), a
weight (the key's share of the rows and the queue when keys compete) and an optional budget in
characters of work per minute.

CHARLSTM_API_KEYS is a comma-separated list; each entry is a key, optionally followed by
`;`-separated attributes:

    CHARLSTM_API_KEYS="k-one, k-two"                          # plain keys: named key1, key2
    CHARLSTM_API_KEYS="s3cret;name=batch;weight=1;chars_per_min=600000, t0ken;name=web;weight=4"

The key is everything before the first `;` (so base64 keys ending in `=` keep working); a key
cannot hold `,` or `;`. The engine knows a tenant by the digest of its key (`scope_of`), which
requests already carry as their state-cache partition (GenerationRequest.cache_scope), so no
key travels to, or is held by, an engine process.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

NAME_PATTERN = r"[A-Za-z0-9_.-]{1,32}"
ATTRIBUTES = ("name", "weight", "chars_per_min")
MAX_WEIGHT = 1000.0
# Without keys every caller is this one tenant (the label of its metrics).
ANONYMOUS = "anonymous"


class ApiKey(BaseModel):
    """One configured key. `key` is excluded from repr and dumps: settings get logged."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str = Field(min_length=1, repr=False, exclude=True)
    name: str = Field(pattern=f"^{NAME_PATTERN}$")
    weight: float = Field(1.0, gt=0, le=MAX_WEIGHT)
    chars_per_min: int | None = Field(None, ge=1)


def parse_entry(entry: str, position: int) -> ApiKey:
    """`key[;name=..][;weight=..][;chars_per_min=..]`; position (from 1) names unnamed keys."""
    key, *attributes = (part.strip() for part in entry.split(";"))
    if not key:
        raise ValueError(f"entry {position} has an empty key")
    if any(c.isspace() for c in key):
        raise ValueError(f"entry {position}: a key cannot contain white space")
    values: dict[str, str] = {}
    for attr in attributes:
        name, eq, value = attr.partition("=")
        name = name.strip()
        if not eq or name not in ATTRIBUTES:
            raise ValueError(
                f"entry {position} ({values.get('name', f'key{position}')}): unknown attribute "
                f"{name or attr!r}; each key takes ;name=NAME, ;weight=NUMBER and "
                ";chars_per_min=INTEGER")
        if name in values:
            raise ValueError(f"entry {position}: {name} given twice")
        values[name] = value.strip()
    label = values.get("name", f"key{position}")
    if not re.fullmatch(NAME_PATTERN, label):
        raise ValueError(f"entry {position}: name must match {NAME_PATTERN}, got {label!r}")
    weight = 1.0
    if "weight" in values:
        try:
            weight = float(values["weight"])
        except ValueError:
            raise ValueError(f"key {label!r}: weight must be a number, got "
                             f"{values['weight']!r}") from None
        if not (math.isfinite(weight) and 0 < weight <= MAX_WEIGHT):
            raise ValueError(f"key {label!r}: weight must be > 0 and <= {MAX_WEIGHT:g}, got "
                             f"{values['weight']}")
    budget = None
    if "chars_per_min" in values:
        try:
            budget = int(values["chars_per_min"])
        except ValueError:
            raise ValueError(f"key {label!r}: chars_per_min must be a whole number, got "
                             f"{values['chars_per_min']!r}") from None
        if budget < 1:
            raise ValueError(f"key {label!r}: chars_per_min must be at least 1, got {budget}")
    return ApiKey(key=key, name=label, weight=weight, chars_per_min=budget)


def parse_keys(value: object) -> list[ApiKey]:
    """CHARLSTM_API_KEYS as a string, or a list of entries (strings, ApiKey or dicts)."""
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple):
        raise ValueError("expected a comma-separated string or a list of keys")
    keys: list[ApiKey] = []
    for i, entry in enumerate(value, 1):
        if isinstance(entry, ApiKey):
            keys.append(entry)
        elif isinstance(entry, str):
            keys.append(parse_entry(entry.strip(), i))
        elif isinstance(entry, dict):
            keys.append(ApiKey(**{"name": f"key{i}", **entry}))
        else:
            raise ValueError(f"entry {i}: expected a string, got {type(entry).__name__}")
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"key names must be unique; given more than once: {', '.join(twice)}")
    secrets = [k.key for k in keys]
    if len(set(secrets)) != len(secrets):
        twice = sorted({k.name for k in keys if secrets.count(k.key) > 1})
        raise ValueError(f"the same key is listed more than once (as {', '.join(twice)})")
    return keys


def scope_of(key: str) -> bytes:
    """The tenant digest of a key: what app.auth.tenant gives the engine (cache_scope)."""
    return hashlib.blake2b(key.encode(), digest_size=32).digest()


@dataclass(frozen=True)
class TenantSpec:
    """What the engine knows of a tenant."""

    name: str
    weight: float = 1.0
    chars_per_min: int | None = None


def tenant_table(keys: Iterable[ApiKey]) -> dict[bytes, TenantSpec]:
    """Tenant digest -> spec, for the engines (empty without keys: one anonymous tenant)."""
    return {scope_of(k.key): TenantSpec(k.name, k.weight, k.chars_per_min) for k in keys}
