"""One model, one worker thread: requests run one at a time, in arrival order, off the event loop.

A model has a single KV cache, so two generations must never interleave on it. Every piece of
model work (tokenizing, generating, embedding) is submitted to the model's own single-thread
executor, which is the queue: the event loop stays free to accept requests, answer /health and
stream the pieces of the running generation. A generation checks its `cancelled` flag after every
piece; the server sets it when the client disconnects, so the next request starts promptly.
"""
import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from ..errors import ZephyrError


class QueueFullError(ZephyrError):
    """More requests are waiting for the model than the server accepts."""


class GenerationStream:
    """The events of one generation: produced on the worker thread, consumed on the event loop."""

    _END = object()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def cancel(self):
        self.cancelled.set()

    def put(self, item):
        """Called on the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:   # the event loop has closed: nobody is listening any more
            self.cancel()

    async def next(self):
        """The next event, or None at the end; re-raises what the generation raised."""
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
        finally:   # a consumer that stops early (the client left) stops the generation
            self.cancel()


class ModelRunner:
    """Serialises all work on one model; at most `max_queue` requests wait or run at once."""

    def __init__(self, llm, max_queue: int = 64):
        self.llm = llm
        self.max_queue = max_queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zephyr-model")
        self._count_lock = threading.Lock()
        self._pending = 0
        self._streams = set()

    @property
    def pending(self) -> int:
        """Requests running or waiting."""
        return self._pending

    def _admit(self):
        with self._count_lock:
            if self._pending >= self.max_queue:
                raise QueueFullError(f"{self._pending} requests are already waiting for the model; retry later")
            self._pending += 1

    def _release(self):
        with self._count_lock:
            self._pending -= 1

    async def call(self, fn, *args):
        """Run fn(llm, *args) on the worker thread and return its result."""
        self._admit()

        def work():
            try:
                return fn(self.llm, *args)
            finally:
                self._release()
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    def stream(self, produce, *args) -> GenerationStream:
        """Start iterating produce(llm, *args) on the worker thread; its items arrive on the stream."""
        self._admit()
        stream = GenerationStream(asyncio.get_running_loop())
        self._streams.add(stream)

        def work():
            try:
                if stream.cancelled.is_set():   # the client left while waiting in the queue
                    return
                events = produce(self.llm, *args)
                try:
                    for event in events:
                        stream.put(event)
                        if stream.cancelled.is_set():
                            break
                finally:
                    events.close()
            except Exception as exc:
                stream.put(exc)
            finally:
                self._release()
                self._streams.discard(stream)
                stream.put(GenerationStream._END)
        self._executor.submit(work)
        return stream

    def shutdown(self):
        """Stop every generation, drop queued requests and wait for the worker to finish."""
        for stream in list(self._streams):
            stream.cancel()
            stream.put(GenerationStream._END)   # its consumer may be waiting on a job that will never run
        self._executor.shutdown(wait=True, cancel_futures=True)
