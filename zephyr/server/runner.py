"""One model, many requests at once, off the event loop.

The scheduler's thread owns the model (continuous batching, zephyr/scheduler.py): every step, one
forward pass serves every running request. Requests are prepared — fields checked, templates
rendered, prompts tokenized — on a small pool of threads, then submitted; their events come back
to the event loop through a `GenerationStream`. A client that leaves cancels its request, and the
scheduler frees its sequence at the next step.
"""
import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import ZephyrError
from ..scheduler import EmbeddingRequest, Scheduler

# Threads that prepare requests (rendering and tokenizing release the GIL in part).
PREPARERS = 2


class QueueFullError(ZephyrError):
    """More requests are waiting for the model than the server accepts."""


class Mailbox:
    """Items for queues on the event loop, posted from other threads. The scheduler posts every
    running stream's token within microseconds of each other at the end of a step: they are
    handed over in one wake-up of the loop, not one each (each wake-up is a pipe write, a poll
    return and a callback, on the cores the forward pass is using)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._items = []

    def post(self, queue: asyncio.Queue, item):
        """Called on any thread; RuntimeError once the event loop has closed."""
        if self.loop.is_closed():
            raise RuntimeError("the event loop has closed")
        with self._lock:
            self._items.append((queue, item))
            wake = len(self._items) == 1   # else a wake-up is already on its way
        if wake:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self):
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


class GenerationStream:
    """The events of one request: produced on other threads, consumed on the event loop."""

    _END = object()

    def __init__(self, mailbox: Mailbox):
        self._mailbox = mailbox
        self._queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.requests = []   # the scheduler requests serving it, cancelled with it

    def cancel(self):
        self.cancelled.set()
        for request in self.requests:
            request.cancel()

    def put(self, item):
        """Called on any thread."""
        try:
            self._mailbox.post(self._queue, item)
        except RuntimeError:   # the event loop has closed: nobody is listening any more
            self.cancel()

    def end(self):
        self.put(self._END)

    async def next(self):
        """The next event, or None at the end; re-raises what the request raised."""
        item = await self._queue.get()
        if item is self._END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def __aiter__(self):
        return self._events()

    async def _events(self):
        try:
            while (item := await self.next()) is not None:
                yield item
        finally:   # a consumer that stops early (the client left) stops the request
            self.cancel()


class ModelRunner:
    """Serves requests on one model through a scheduler; at most `max_queue` run or wait at once.
    cache_bytes: RAM for conversation prefixes the KV cache's sequences lose (0: none)."""

    def __init__(self, llm, max_queue: int = 64, cache_bytes: int = 0):
        self.llm = llm
        self.max_queue = max_queue
        self.scheduler = Scheduler(llm, cache_bytes=cache_bytes, max_waiting=max_queue)
        self._thread = threading.Thread(target=self.scheduler.serve, name="zephyr-scheduler", daemon=True)
        self._thread.start()
        self._prepare = ThreadPoolExecutor(max_workers=PREPARERS, thread_name_prefix="zephyr-prepare")
        self._count_lock = threading.Lock()
        self._pending = 0
        self._streams = set()
        self._mailbox = None   # made on the event loop of the first request

    @property
    def pending(self) -> int:
        """Requests running or waiting."""
        return self._pending

    def _admit(self):
        with self._count_lock:
            if self._pending >= self.max_queue:
                raise QueueFullError(f"{self._pending} requests are already running or waiting for the model; "
                                     f"retry later")
            self._pending += 1

    def _release(self):
        with self._count_lock:
            self._pending -= 1

    def stream(self, prepare, *args) -> GenerationStream:
        """prepare(llm, *args) -> (first event, completion) on a preparing thread, then the
        completion's requests on the scheduler: the first event, then every (choice, step) Event,
        arrive on the stream."""
        self._admit()
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = Mailbox(loop)
        stream = GenerationStream(self._mailbox)
        self._streams.add(stream)

        def finish():
            self._release()
            self._streams.discard(stream)
            stream.end()

        def work():
            try:
                if stream.cancelled.is_set():   # the client left while waiting
                    return finish()
                first, completion = prepare(self.llm, *args)
                stream.put(first)
                ends = []

                def on_event(event):
                    if event.choice is not None:
                        stream.put(event)
                    else:
                        if event.error is not None:
                            stream.put(event.error)
                        ends.append(event)
                        if len(ends) == len(stream.requests):
                            finish()
                stream.requests = completion.requests(self.llm, on_event)
                for request in stream.requests:
                    self.scheduler.submit(request)
                if stream.cancelled.is_set():
                    stream.cancel()
            except Exception as exc:   # noqa: BLE001 - reported to the client, the server goes on
                for request in stream.requests:
                    request.cancel()
                stream.put(exc)
                finish()
        self._prepare.submit(work)
        return stream

    async def embed(self, inputs) -> list:
        """The mean final hidden state of each token list in `inputs`, evaluated on the scheduler."""
        self._admit()
        try:
            requests = [EmbeddingRequest(tokens) for tokens in inputs]
            for request in requests:
                self.scheduler.submit(request)
            loop = asyncio.get_running_loop()
            for request in requests:
                await loop.run_in_executor(self._prepare, request.done.wait)
                if request.error is not None:
                    raise request.error
            return [request.hidden.mean(axis=0).astype(np.float32).tolist() for request in requests]
        finally:
            self._release()

    async def call(self, fn, *args):
        """fn(llm, *args) on a preparing thread (tokenizing and the like)."""
        return await asyncio.get_running_loop().run_in_executor(self._prepare, fn, self.llm, *args)

    def shutdown(self):
        """Stop every request and the scheduler's thread, and wait for them."""
        for stream in list(self._streams):
            stream.cancel()
            stream.end()   # its consumer may be waiting on a request that will never run
        self._prepare.shutdown(wait=True, cancel_futures=True)
        self.scheduler.stop()
        self._thread.join()
