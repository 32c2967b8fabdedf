"""Web origins and host names as the operator lists them (`QWEN_IMAGE_ALLOWED_ORIGINS`,
`QWEN_IMAGE_ALLOWED_HOSTS`) and as browsers send them (`Origin`, `Referer`, `Host`).

One canonical form for an origin, `scheme://host:port` with the port always written, so that
`https://Example.com`, `https://example.com:443` and `https://example.com/` compare equal.
"""

from __future__ import annotations

from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}


def canonical_origin(text: str) -> str | None:
    """'HTTPS://Example.com' -> 'https://example.com:443'; None for anything that is not an
    http(s) origin (a path, a query, credentials, the opaque origin 'null')."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port  # raises for a port that is not a number in range
    except ValueError:
        return None
    if (parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.username is not None
            or parts.path not in ("", "/") or parts.query or parts.fragment):
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname  # IPv6
    return f"{parts.scheme}://{host}:{port or DEFAULT_PORTS[parts.scheme]}"


def referer_origin(referer: str) -> str | None:
    """The canonical origin of the page a `Referer` names (its scheme and authority)."""
    try:
        parts = urlsplit(referer.strip())
    except ValueError:
        return None
    return canonical_origin(f"{parts.scheme}://{parts.netloc}")


def origin_of_host(scheme: str, host: str) -> str | None:
    """The origin a `Host` header names when reached over `scheme` (its default port when the
    header has none), canonical; None for a Host that is not a host[:port]."""
    return canonical_origin(f"{scheme}://{host}") if "/" not in host and "@" not in host else None


def check_host_pattern(pattern: str) -> str:
    """A host name, or `*` (any), or `*.example.com` (its subdomains), lowercased (the patterns
    Starlette's TrustedHostMiddleware takes); ValueError for anything else."""
    pattern = pattern.strip().lower()
    if "*" in pattern[1:] or (pattern.startswith("*") and pattern != "*" and not pattern.startswith("*.")):
        raise ValueError(f"{pattern!r} is not a host name, '*' or '*.domain'")
    ip_literal = pattern.startswith("[") and pattern.endswith("]")  # IPv6, as in a Host header
    if "/" in pattern or (":" in pattern and not ip_literal):
        raise ValueError(f"{pattern!r} is not a host name (no scheme, port or path: 'example.com', "
                         "'[::1]')")
    return pattern
