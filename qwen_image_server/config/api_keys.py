"""API keys as identities: each key has an id (what jobs, images and files record as their owner,
never the key itself) and its own limits.

Keys come from `QWEN_IMAGE_API_KEYS` (or `--api-key`), each with the server-wide limits, and from
`QWEN_IMAGE_API_KEYS_FILE`, a TOML file that keeps keys out of `ps` and the environment and may
set limits per key:

    [[keys]]
    key = "sk-team-a-..."
    name = "team-a"            # the owner id in logs; default: key-<12 hex of the key's SHA-256>
    max_jobs = 8               # queued or running at once; default QWEN_IMAGE_KEY_MAX_JOBS
    requests_per_minute = 120  # image requests; default QWEN_IMAGE_KEY_REQUESTS_PER_MINUTE
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

# Shorter keys can be guessed online; 16 characters of a random token are ~96 bits.
MIN_KEY_LENGTH = 16


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """What one key may have at once. None: no limit of that kind."""

    max_jobs: int | None = None  # images queued or running
    requests_per_minute: int | None = None  # requests that make images


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request comes from: an API key's id and limits, or nobody (a server without keys)."""

    id: str | None = None
    limits: KeyLimits = KeyLimits()

    @property
    def keyed(self) -> bool:
        return self.id is not None


ANONYMOUS = Caller()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One accepted key; `secret` is compared, `caller` is what the request then acts as."""

    secret: bytes
    caller: Caller

    def __repr__(self) -> str:  # never the secret
        return f"ApiKey(id={self.caller.id!r})"


def key_id(secret: str) -> str:
    """A stable id for a key that reveals nothing usable about it."""
    return "key-" + hashlib.sha256(secret.encode("utf-8")).hexdigest()[:12]


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: SecretStr = Field(min_length=MIN_KEY_LENGTH)
    name: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    max_jobs: int | None = Field(None, ge=1)
    requests_per_minute: int | None = Field(None, ge=1)


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry] = Field(default_factory=list)


def read_key_file(path: Path) -> KeyFile:
    """The keys file, validated; ValueError (one line naming the file) when it cannot be used."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read the API keys file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"the API keys file {path} is not valid TOML: {exc}") from None
    try:
        return KeyFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ValueError(f"the API keys file {path}: {where}: {first['msg']}") from None


def build_keys(plain: list[SecretStr], file: KeyFile | None, defaults: KeyLimits) -> list[ApiKey]:
    """Every accepted key with its id and limits (a key in both places takes the file's entry)."""
    keys: dict[str, ApiKey] = {}
    for secret in plain:
        value = secret.get_secret_value()
        keys[value] = ApiKey(value.encode("utf-8"), Caller(key_id(value), defaults))
    names: set[str] = set()
    for entry in file.keys if file else []:
        value = entry.key.get_secret_value()
        ident = entry.name or key_id(value)
        if ident in names:
            raise ValueError(f"the API keys file names '{ident}' twice; each key needs its own name")
        names.add(ident)
        limits = KeyLimits(
            max_jobs=entry.max_jobs if entry.max_jobs is not None else defaults.max_jobs,
            requests_per_minute=(entry.requests_per_minute if entry.requests_per_minute is not None
                                 else defaults.requests_per_minute),
        )
        keys[value] = ApiKey(value.encode("utf-8"), Caller(ident, limits))
    return list(keys.values())
