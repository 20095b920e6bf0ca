"""What stands between the network and the model: API key, body-size cap, safe headers, loopback-only by default.

This is plain ASGI middleware (not a FastAPI dependency) so it runs before any routing or JSON parsing: an
unauthenticated or oversized request never reaches a handler, and its body is never read past the cap.
"""

from __future__ import annotations

import hmac
import ipaddress

from chatforge.errors import ChatforgeError

# Reachable without a key: the health probe and the chat page's own files (the page asks for the key itself).
PUBLIC_PATHS = frozenset({"/health", "/"})
PUBLIC_PREFIXES = ("/static/",)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve to anything, so it counts as public


def check_bind(host: str, api_key: str | None, allow_insecure_public: bool) -> None:
    """Refuse to expose an unauthenticated server beyond this machine unless told so explicitly."""
    if not is_loopback(host) and not api_key and not allow_insecure_public:
        raise ChatforgeError(
            f"serve: refusing to listen on {host} without an API key; set CHATFORGE_API_KEY (or --api-key), "
            "or pass --allow-insecure-public if anyone who can reach this address may use the model")


class Guard:
    """ASGI middleware: Bearer API key (constant-time), request body cap, and headers every response carries."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def _reject(self, send, status: int, message: str, type_: str, code: str, headers=()) -> None:
        from chatforge.serve.schemas import ErrorResponse

        body = ErrorResponse.of(message, type_, None, code).to_json()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *headers]})
        await send({"type": "http.response.body", "body": body})

    def _authorized(self, scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                for k, v in ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                             (b"x-frame-options", b"DENY")):
                    if k not in names:
                        headers.append((k, v))
                message = {**message, "headers": headers}
            await send(message)

        path = scope["path"]
        if self.key is not None and path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES):
            if not self._authorized(scope):
                return await self._reject(
                    send_with_headers, 401,
                    "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                    "invalid_request_error", "invalid_api_key", [(b"www-authenticate", b"Bearer")])

        too_large = (f"Request body too large: the limit is {self.max_body_bytes} bytes.", "invalid_request_error",
                     "request_too_large")
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await self._reject(send_with_headers, 400, "Invalid Content-Length header.",
                                              "invalid_request_error", "invalid_request")
                if declared > self.max_body_bytes:
                    return await self._reject(send_with_headers, 413, *too_large)
        # Read the whole body here (bounded), then replay it: handlers never see more than the cap.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await self._reject(send_with_headers, 413, *too_large)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards only http.disconnect, which handlers watch to abort generation

        await self.app(scope, replay, send_with_headers)
