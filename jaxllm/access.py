"""Who may call the server, and how much they may send: an ASGI middleware in front
of the app (server.py).

- `/v1/*` needs `Authorization: Bearer KEY` when the server has an API key (as
  llama-server's and vLLM's `--api-key`); `/metrics` needs the metrics key when one is
  set; `/health` is always open. Keys are compared in constant time.
- A body over `max_body_bytes` gets 413 before the app reads it: by its
  Content-Length, or, sent in chunks without one, as soon as the bytes received pass
  the limit.
Refusals are OpenAI-style bodies {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import hmac
import json
from typing import Optional

MAX_BODY_BYTES = 8 << 20


def _refusal(status: int, message: str, kind: str, code: str) -> tuple[int, bytes]:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return status, json.dumps(body).encode()


def authorized(header: bytes, key: str) -> bool:
    """Whether an Authorization header carries `Bearer key` (constant-time comparison)."""
    scheme, _, given = header.decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


class Guard:
    """ASGI middleware: the API key, the metrics key and the body size limit."""

    def __init__(self, app, api_key: Optional[str] = None, metrics_key: Optional[str] = None,
                 max_body_bytes: int = MAX_BODY_BYTES):
        self.app, self.api_key, self.metrics_key, self.max_body_bytes = app, api_key, metrics_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        path = scope.get("path", "")
        key = self.api_key if path.startswith("/v1/") else self.metrics_key if path == "/metrics" else None
        if key is not None and not authorized(headers.get(b"authorization", b""), key):
            return await self._send(send, *_refusal(
                401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                "invalid_request_error", "invalid_api_key"))
        length = headers.get(b"content-length")
        too_large = _refusal(413, f"the request body is larger than {self.max_body_bytes} bytes",
                             "invalid_request_error", "request_too_large")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_body_bytes:
                return await self._send(send, *too_large)
            return await self.app(scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # No Content-Length (chunked): read the body here, within the limit, then hand it on.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await self._send(send, *too_large)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the disconnect
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        return await self.app(scope, replay, send)

    @staticmethod
    async def _send(send, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
