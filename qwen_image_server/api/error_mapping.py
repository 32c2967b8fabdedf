"""The one place where errors become HTTP responses: `{"error": {message, type, param, code}}`."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen_image_server.errors import ServerError
from qwen_image_server.protocol.common import ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)

# OpenAPI `responses=` for routes that queue work: every error they can answer has one shape.
ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorResponse} for status in (400, 429, 500, 503, 504)
}
# ... and for those that can save their image (save_to_file): 507 insufficient_storage while the
# output disk is below its free-space floor.
SAVE_ERROR_RESPONSES: dict[int | str, dict] = {507: {"model": ErrorResponse}}

_HTTP_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def error_response(
    status: int,
    message: str,
    type_: str,
    *,
    param: str | None = None,
    code: str | None = None,
    retry_after: float | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code))
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def server_error_response(exc: ServerError) -> JSONResponse:
    """The response for one of our error values (also used by middleware, outside the handlers)."""
    response = error_response(exc.status_code, exc.message, exc.type, param=exc.param,
                              code=exc.code, retry_after=exc.retry_after)
    response.headers.update(exc.headers)
    return response


def _param_of(loc: tuple[int | str, ...]) -> str:
    """('body', 'seed') -> 'seed'; ('body', 'loras', 0, 'name') -> 'loras[0].name'; ('body',) or a
    JSON position -> 'body'."""
    if len(loc) == 2 and isinstance(loc[1], int):
        return "body"
    param = ""
    for part in loc:
        if part in ("body", "query", "path", "header"):
            continue
        param += f"[{part}]" if isinstance(part, int) else f".{part}" if param else str(part)
    return param or "body"


def validation_error_response(exc: RequestValidationError, content_type: str | None = None) -> JSONResponse:
    first = exc.errors()[0]
    kind = first.get("type", "invalid")
    if kind == "json_invalid":
        return error_response(400, f"The request body is not valid JSON: {first.get('msg')}.",
                              "invalid_request_error", param="body", code="json_invalid")
    param = _param_of(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid value"))
    if param == "body" and kind in ("model_attributes_type", "dict_type", "missing"):
        message = "The request body must be a JSON object."
        media_type = (content_type or "").split(";")[0].strip().lower()
        if media_type and media_type != "application/json" and not media_type.endswith("+json"):
            # FastAPI reads a body as JSON only when the header says so (curl -d sends a form type).
            message += f" It was sent as {media_type!r}: send the header 'Content-Type: application/json'."
    else:
        message = f"Invalid value for '{param}': {message}."
    return error_response(400, message, "invalid_request_error", param=param, code=kind)


def install_error_handlers(app: FastAPI) -> None:
    """Map every error the app can raise to the common JSON shape."""

    @app.exception_handler(ServerError)
    async def _server_error(request: Request, exc: ServerError) -> JSONResponse:
        return server_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_response(exc, request.headers.get("content-type"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = _HTTP_TYPES.get(exc.status_code, "invalid_request_error")
        # 413 comes from the body limit counting a body as it arrives (api/body_limit.py).
        code = "body_too_large" if exc.status_code == 413 else None
        response = error_response(exc.status_code, str(exc.detail), type_, code=code)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "Internal server error; the server logged the details.", "server_error")
