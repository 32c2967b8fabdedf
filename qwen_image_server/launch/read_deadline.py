"""A deadline on what a client owes the server (its request line and headers, then its body), and
a cap on the connections the process holds.

uvicorn starts no timer while it waits for a request: its keep-alive timer runs only between
requests and stops at the first byte of the next one. A client that connects and sends nothing,
or trickles its headers or its body a byte at a time (slowloris), keeps its connection, and a file
descriptor, for as long as it likes; a few thousand such sockets use up the process's descriptors
and every route stops answering, /health included. These subclasses of uvicorn's HTTP/1.1
protocols give each connection one deadline, `request_read_timeout_s`, for what the client owes:

- the request line and headers, counted from the connection's start, or from the first byte of
  the next request on a kept-alive connection (the idle time before it is uvicorn's keep-alive
  timeout's business);
- the body, counted from the end of the headers.

A connection that misses the deadline for its headers is closed. One that misses it for its body
is answered 408 in the common JSON error shape, if no response has started, and closed. The app's
turn is never limited: a long generation, an SSE or OpenAI stream, once the request is in, runs as
long as it takes. Time during which the server itself stopped reading (a body's unread first 64 KiB
wait for the app, or a pipelined request waits its turn) does not count against the client.

Beyond `max_connections` open connections, one more is closed as soon as it is accepted, so its
descriptor is free again at once (uvicorn's `limit_concurrency`, set to the same number, answers 503
only once a request's headers are in: slow clients beyond it would still hold descriptors).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from typing import Any, ClassVar, Protocol

import h11
from uvicorn._types import HTTPScope
from uvicorn.protocols.http.flow_control import CLOSE_HEADER, FlowControl
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string
from uvicorn.server import ServerState

from qwen_image_server import errors
from qwen_image_server.api.error_mapping import server_error_response

log = logging.getLogger(__name__)


class Owed(enum.Enum):
    """What the client still has to send before the app can have the request."""

    HEAD = "request line and headers"
    BODY = "request body"


class Cycle(Protocol):
    """The parts of a uvicorn request/response cycle (h11's or httptools') the deadline uses."""

    scope: HTTPScope
    response_started: bool
    response_complete: bool
    disconnected: bool
    keep_alive: bool
    message_event: asyncio.Event


class RefusalLog:
    """Says how many connections the cap refused, at most once per `every_s` (a flood of refused
    connections would otherwise flood the log)."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self.refused = 0
        self._last = -math.inf

    def note(self, cap: int) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._last >= self.every_s:
            log.warning("refused %d connection(s) in the last %gs or less: %d are open, the most "
                        "max_connections allows", self.refused, self.every_s, cap)
            self.refused = 0
            self._last = now


REFUSALS = RefusalLog()


def timeout_response(default_headers: list[tuple[bytes, bytes]], timeout_s: float) -> bytes:
    """The 408 for a body that did not arrive in time, as bytes on the wire, closing the connection."""
    response = server_error_response(errors.RequestTimeout(
        f"The request body did not arrive within {timeout_s:g} s of its headers; the connection is closed.",
        code="body_timeout"))
    lines = [b"HTTP/1.1 408 Request Timeout"]
    lines += [name + b": " + value for name, value in [*default_headers, *response.raw_headers, CLOSE_HEADER]]
    return b"\r\n".join(lines) + b"\r\n\r\n" + bytes(response.body)


class ReadDeadline(asyncio.Protocol):
    """Mixed into a uvicorn protocol class (before it): the deadline and the cap. The protocol calls
    `_admit` when a connection is made, `_watch` after anything that can change what the client owes,
    and `_stop_watching` when the connection is lost."""

    # Set per server by `deadline_protocol` (uvicorn makes the protocol objects itself).
    read_timeout_s: ClassVar[float] = 30.0
    max_connections: ClassVar[int | None] = None

    # The uvicorn protocol's own attributes, which both protocols have.
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    flow: FlowControl
    server_state: ServerState
    timeout_keep_alive_task: asyncio.TimerHandle | None
    access_log: bool
    access_logger: logging.Logger
    cycle: Any  # the current request's (uvicorn's RequestResponseCycle of that protocol)

    _deadline: asyncio.TimerHandle | None = None
    _watching: tuple[Owed, Cycle | None] | None = None  # what the running deadline is for

    # asyncio's hooks, the same on both protocols: each runs the protocol's own (next in the
    # MRO), then what the deadline needs.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._admit()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_watching()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch(self._owed(), self.cycle)

    def _owed(self) -> Owed | None:
        """What the client still owes now (the protocol's parser knows)."""
        raise NotImplementedError

    def _admit(self) -> None:
        cap = self.max_connections
        if cap is not None and len(self.server_state.connections) > cap:
            REFUSALS.note(cap)
            self.transport.close()
            return
        self._watch(Owed.HEAD, None)

    def _watch(self, owed: Owed | None, cycle: Cycle | None) -> None:
        """Keep the running deadline while the client owes the same part of the same request, start
        one when it begins to owe something else, stop when it owes nothing."""
        # After a WebSocket upgrade the connection belongs to another protocol object.
        mine = not self.transport.is_closing() and self.transport.get_protocol() is self
        watching = (owed, cycle) if owed is not None and mine else None
        if watching == self._watching:
            return
        self._stop_watching()
        self._watching = watching
        if watching is not None:
            self._deadline = self.loop.call_later(self.read_timeout_s, self._deadline_passed)

    def _stop_watching(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._watching = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self._watching is None or self.transport.is_closing():
            return
        if self.flow.read_paused:
            # The server stopped reading (the app has not taken the body read so far, or a pipelined
            # request waits its turn): that wait is the server's, not the client's.
            self._deadline = self.loop.call_later(self.read_timeout_s, self._deadline_passed)
            return
        owed, cycle = self._watching
        if owed is Owed.HEAD or cycle is None or cycle.response_complete:
            log.debug("closing a connection that did not send its %s within %gs", owed.value, self.read_timeout_s)
            self.transport.close()
        elif not cycle.response_started:
            self._answer_timeout(cycle)
        else:
            # The app is answering without the rest of the body: close once its answer is out.
            cycle.keep_alive = False

    def _answer_timeout(self, cycle: Cycle) -> None:
        # The app waiting on the body now receives http.disconnect, and whatever it sends is dropped.
        cycle.disconnected = True
        cycle.message_event.set()
        scope = cycle.scope
        if self.access_log:
            self.access_logger.info('%s - "%s %s HTTP/%s" %d', get_client_addr(scope), scope["method"],
                                    get_path_with_query_string(scope), scope["http_version"], 408)
        self.transport.write(timeout_response(self.server_state.default_headers, self.read_timeout_s))
        self.transport.close()


class DeadlineH11Protocol(ReadDeadline, H11Protocol):
    """uvicorn's h11 protocol with the read deadline and the connection cap."""

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch(self._owed(), self.cycle)

    def _owed(self) -> Owed | None:
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            return Owed.BODY
        if state is h11.IDLE and self.timeout_keep_alive_task is None:
            return Owed.HEAD
        return None  # the app's turn, or idle between requests under the keep-alive timer
