"""The read deadline and connection cap (`read_deadline.py`) on uvicorn's httptools protocol, which
uvicorn prefers where httptools is installed (as with Ray Serve's dependencies). Its own module:
importing it needs httptools."""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from qwen_image_server.launch.read_deadline import Owed, ReadDeadline


class DeadlineHttpToolsProtocol(ReadDeadline, HttpToolsProtocol):
    """uvicorn's httptools protocol with the read deadline and the connection cap."""

    _body_owed = False  # between a request's headers and the end of its body

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch(self._owed(), self.cycle)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._body_owed = True

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._body_owed = False

    def _owed(self) -> Owed | None:
        if self._body_owed:
            return Owed.BODY
        if (self.cycle is None or self.cycle.response_complete) and self.timeout_keep_alive_task is None:
            return Owed.HEAD
        return None  # the app's turn, or idle between requests under the keep-alive timer
