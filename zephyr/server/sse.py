"""Server-Sent Events: `data: {json}` lines, then `data: [DONE]`, and noticing a client that leaves.

Starlette's StreamingResponse only learns of a disconnect when a write fails, which may be long
after the client left (a slow token, held-back stop-string text). `EventStreamResponse` listens
for the disconnect message itself and calls `on_disconnect` at once.
"""
import json

import anyio
from starlette.responses import StreamingResponse

DONE = b"data: [DONE]\n\n"


def encode(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


async def listen_for_disconnect(receive, on_disconnect):
    """Return (after calling on_disconnect) when the client has gone; the request body must be read."""
    while (await receive())["type"] != "http.disconnect":
        pass
    on_disconnect()


class EventStreamResponse(StreamingResponse):
    """Streams `events` (an async iterator of bytes already in SSE form)."""

    def __init__(self, events, on_disconnect):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_disconnect = on_disconnect

    async def __call__(self, scope, receive, send):
        async with anyio.create_task_group() as tasks:
            async def watch():
                await listen_for_disconnect(receive, self.on_disconnect)
                tasks.cancel_scope.cancel()
            tasks.start_soon(watch)
            try:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                async for chunk in self.body_iterator:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:   # the connection broke while writing
                self.on_disconnect()
            finally:
                tasks.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await self.body_iterator.aclose()
