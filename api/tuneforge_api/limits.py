"""Request body limits, enforced while the body streams in (not after buffering): size,
pace (a stalled or trickling body is cut off), and no compressed bodies."""

from __future__ import annotations

import asyncio
import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tuneforge_api.errors import BodyTooLarge, envelope


class BodySizeLimit:
    """Answers 413 as soon as a body passes its limit: uploads get ``upload_limit``,
    every other request ``default_limit``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        upload_limit: int,
        default_limit: int = 1024 * 1024,
        idle_timeout_s: float = 30.0,
        min_bytes_per_s: int = 1024,
    ) -> None:
        self.app, self.upload_limit, self.default_limit = app, upload_limit, default_limit
        self.idle_timeout_s, self.min_bytes_per_s = idle_timeout_s, min_bytes_per_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_limit if scope["path"].rstrip("/") == "/v1/files" else self.default_limit
        # Multipart framing adds a little to the file itself.
        limit += 64 * 1024 if limit == self.upload_limit else 0
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _reject(send, limit)
            return
        # Bodies are never decompressed, so a gzip bomb cannot expand: refuse encoded bodies.
        if headers.get(b"content-encoding", b"identity").strip().lower() not in (b"", b"identity"):
            await _send_error(send, 415, "unsupported_content_encoding", UNSUPPORTED_ENCODING)
            return
        seen = 0
        started = False
        body_done = False
        violation: BodyTooLarge | BodyTimeout | None = None
        begun = time.monotonic()

        async def counted_receive() -> Message:
            nonlocal seen, body_done, violation
            if violation is not None:
                raise violation
            if body_done:  # after the body, receive() waits for a disconnect: no deadline
                return await receive()
            # Slowloris guard: each chunk within the idle timeout, and, past that, an average
            # rate of at least min_bytes_per_s since the body began.
            allowed = self.idle_timeout_s + seen / self.min_bytes_per_s - (time.monotonic() - begun)
            try:
                message = await asyncio.wait_for(receive(), max(0.0, min(self.idle_timeout_s, allowed)))
            except asyncio.TimeoutError:
                violation = BodyTimeout()
                raise violation from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > limit:
                    violation = BodyTooLarge(limit)
                    raise violation
            else:
                body_done = True
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if violation is not None:
                # The app may have turned our exception into its own error (FastAPI answers
                # 400 for a body it could not read): answer with the real reason instead.
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _reject_for(send, violation)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracking_send)
        except (BodyTooLarge, BodyTimeout) as exc:
            if not started:
                await _reject_for(send, exc)


class BodyTimeout(Exception):
    """The request body stopped arriving, or arrives too slowly (a slowloris client)."""

    def __init__(self) -> None:
        super().__init__("The request body arrived too slowly; the request was cut off.")


UNSUPPORTED_ENCODING = "Content-Encoding is not supported on requests; send the body uncompressed."


async def _reject(send: Send, limit: int) -> None:
    await _send_error(send, 413, "request_too_large", str(BodyTooLarge(limit)))


async def _reject_for(send: Send, exc: BodyTooLarge | BodyTimeout) -> None:
    if isinstance(exc, BodyTooLarge):
        await _reject(send, exc.limit)
    else:
        await _send_error(send, 408, "request_timeout", str(exc), close=True)


async def _send_error(send: Send, status: int, code: str, message: str, *, close: bool = False) -> None:
    body = json.dumps(envelope(status, code, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
