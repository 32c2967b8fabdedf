"""What bounds the connections of the front process, however it starts (`qwen-image serve`, Gunicorn
with `QwenImageWorker`, plain uvicorn, the tests' in-process server): the open-file limit raised at
start, a cap on open connections, and a deadline on each client's request (`read_deadline.py`).

Ray Serve's HTTP proxy is Ray's own uvicorn server, outside these: put a proxy that buffers requests
(nginx, a cloud load balancer) in front of a Ray deployment exposed to untrusted clients.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import sys
from typing import Any

import uvicorn

from qwen_image_server.config.settings import Settings
from qwen_image_server.launch.read_deadline import DeadlineH11Protocol, ReadDeadline

log = logging.getLogger(__name__)

# The default connection cap: a share of the open-file limit, leaving the rest to the process's
# own files (engine pipes, model files, uploads spooled to disk, saved images, logs), and at most
# DEFAULT_MAX_CONNECTIONS: far more than one front needs (its queue holds 32 jobs; /health probes,
# SSE subscribers and keep-alive pools come on top), and it bounds the memory clients can pin.
CONNECTION_SHARE = 0.75
DEFAULT_MAX_CONNECTIONS = 10_000
# Where no hard limit is set (macOS reports RLIM_INFINITY but refuses it), the soft limit tried.
UNLIMITED_TARGET = 10_240
# Below this, a few thousand slow clients still fill the descriptor table: say how to raise it.
LOW_LIMIT = 4096


def open_file_limit() -> int | None:
    """This process's soft limit on open files, or None where there is none (Windows, unlimited)."""
    if sys.platform == "win32":
        return None
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def raise_open_file_limit() -> int | None:
    """Raise the soft limit on open files to the hard limit, and log it: the soft limit (1024 under
    systemd and in most containers) is what a few hundred slow clients would otherwise use up.
    Returns the limit now (None on Windows, or where it is unlimited)."""
    if sys.platform == "win32":
        return None
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("open-file limit stays %d: raising it to %d failed (%s)", soft, target, exc)
            return soft
        log.info("open-file limit: %d (raised from %d)", target, soft)
        soft = target
    elif soft == resource.RLIM_INFINITY:
        log.info("open-file limit: unlimited")
        return None
    else:
        log.info("open-file limit: %d", soft)
    if soft < LOW_LIMIT:
        log.warning("the open-file limit, %d, allows few connections: raise the hard limit (ulimit -Hn, "
                    "systemd LimitNOFILE=, docker --ulimit nofile=)", soft)
    return soft


def connection_cap(settings: Settings) -> int:
    """`max_connections`, or by default a share of the open-file limit as it is now."""
    if settings.max_connections is not None:
        return settings.max_connections
    limit = open_file_limit()
    if limit is None:
        return DEFAULT_MAX_CONNECTIONS
    return max(1, min(DEFAULT_MAX_CONNECTIONS, int(limit * CONNECTION_SHARE)))


def deadline_protocol(http: Any, read_timeout_s: float, max_connections: int | None) -> type[asyncio.Protocol]:
    """The protocol class for uvicorn's `http` setting ("auto", "h11" or "httptools"; "auto" takes
    httptools where it is installed, as uvicorn does), with the read deadline and connection cap."""
    if http == "auto":
        http = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
    base: type[ReadDeadline]
    if http == "h11":
        base = DeadlineH11Protocol
    elif http == "httptools":
        from qwen_image_server.launch.read_deadline_httptools import DeadlineHttpToolsProtocol

        base = DeadlineHttpToolsProtocol
    else:
        raise ValueError(f"no read deadline for uvicorn's http={http!r}: use auto, h11 or httptools")
    # uvicorn makes one protocol object per connection from the class alone: the values ride on it.
    return type(base.__name__, (base,), {"read_timeout_s": read_timeout_s, "max_connections": max_connections})


def bound_connections(config: uvicorn.Config, settings: Settings) -> None:
    """Give `config` (not loaded yet) the read deadline and the connection cap of `settings`.

    Call it after `raise_open_file_limit`: the default cap is a share of the limit."""
    cap = connection_cap(settings)
    config.http = deadline_protocol(config.http, settings.request_read_timeout_s, cap)
    config.limit_concurrency = cap
    log.info("connections: at most %d (max_connections); %gs to send a request's headers, and as long for its "
             "body (request_read_timeout_s)", cap, settings.request_read_timeout_s)
