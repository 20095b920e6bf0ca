"""Every failure answered as OpenAI does: its error object (schemas.ErrorResponse) with the matching status.

APIError is what a handler raises for a request it refuses; the handlers installed here turn it, unknown routes,
wrong methods and unexpected exceptions into that object. engine_error says what a client is told when generation
itself fails (a user's mistake the engine caught is a 400, a bug is a 500 with nothing of its details).
"""

from __future__ import annotations

import logging

from chatforge.errors import ChatforgeError

log = logging.getLogger("chatforge.serve")


class APIError(Exception):
    """A request the server refuses, with the status and OpenAI error fields to answer it with."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}


class ClientGone(Exception):
    """The client disconnected before its reply was ready; nothing is sent."""


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None):
    from starlette.responses import Response

    from chatforge.serve.schemas import ErrorResponse

    return Response(ErrorResponse.of(message, type_, param, code).to_json(), status_code=status,
                    media_type="application/json", headers=headers)


def engine_error(e: Exception):
    """(status, ErrorResponse) for an exception raised while generating."""
    from chatforge.serve.schemas import ErrorResponse

    if isinstance(e, ChatforgeError):
        return 400, ErrorResponse.of(str(e))
    log.exception("generation failed", exc_info=e)
    return 500, ErrorResponse.of("The server had an error while generating the reply.", "server_error")


def install_error_handlers(app) -> None:
    """Answer every error with OpenAI's error object, FastAPI's own 404/405/422 included."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(APIError)
    async def api_error(_request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, e: StarletteHTTPException):
        messages = {404: "Unknown URL; see /openapi.json for the API.", 405: "Method not allowed for this URL."}
        return error_response(e.status_code, messages.get(e.status_code, str(e.detail)), "invalid_request_error",
                              None, {404: "not_found", 405: "method_not_allowed"}.get(e.status_code),
                              getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, e: RequestValidationError):
        first = (e.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(400, f"Invalid value for '{param}': {first.get('msg', 'invalid')}.",
                              "invalid_request_error", param, "invalid_request")

    @app.exception_handler(Exception)
    async def server_error(_request, e: Exception):
        log.exception("unhandled error", exc_info=e)
        return error_response(500, "The server had an error processing your request.", "server_error")
