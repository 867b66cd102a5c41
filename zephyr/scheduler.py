"""Many conversations on one model at once: continuous batching over the KV cache's sequences.

A `Scheduler` owns a loaded `LLM`'s sequence slots. A `Request` is a prompt and the answers to
generate for it (one `Generation` each; n > 1 share the prompt's keys and values, copied once).
Every `step` runs ONE forward pass over the next token of every answer being generated plus
chunks of the prompts still being read, at most `token_budget` tokens in all, so the weights are
read once for all of them; then each answer's Generation picks its token from its own logits.
Requests join at the next step and leave when they finish or are cancelled; the others go on.

Prefix cache: a request takes the free slot whose tokens share the longest prefix with its prompt
(llama.cpp's slot similarity) and evaluates only the rest. When another slot, busy or not, holds a
longer prefix (a system prompt that every conversation starts with), its keys and values are copied
into the request's slot instead of evaluated again. A slot keeps the logits that followed its
last prompt, so the same prompt again is not evaluated at all and answers exactly as before (its last
token evaluated alone would round differently from the batch it was read in). With `cache_bytes`,
what a slot is about to lose is kept in RAM (least recently used first out) and restored when a
later prompt starts with it. Embeddings (`EmbeddingRequest`) use a free slot too, and leave their
tokens there for reuse.

Threads: `submit` and `Request.cancel` may be called from any thread; `step` (and `run`, `serve`)
from one thread, which then owns the model.
"""
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .backend import Batch
from .errors import ContextOverflowError, ZephyrError
from .generation import Generation, Step


class SchedulerFullError(ZephyrError):
    """More requests are waiting for the model than the scheduler accepts."""


@dataclass
class Event:
    """What a request reports: a step of answer `choice`; or its end (choice None), with the error
    that ended it, if any."""

    choice: Optional[int]
    step: Optional[Step] = None
    error: Optional[BaseException] = None


class Request:
    """A prompt and the generations answering it. Its events go to `on_event(event)`, if given (called
    on the thread that steps the scheduler), ending with Event(None); `done` is set after that, and
    `error` holds what ended it if it failed. The generations hold what they produced."""

    def __init__(self, prompt_tokens, generations, on_event: Callable = None):
        self.prompt = [int(t) for t in prompt_tokens]
        self.generations = list(generations)
        if not self.prompt or not self.generations:
            raise ValueError("a request needs a prompt of at least one token and at least one generation")
        self.on_event = on_event or (lambda event: None)
        self.cancelled = threading.Event()
        self.done = threading.Event()     # set when it has ended, after its last event
        self.error = None                 # what ended it, if it failed

    def cancel(self):
        """Stop generating for it (the client went away); its slots are freed at the next step."""
        self.cancelled.set()


class EmbeddingRequest(Request):
    """Token ids whose final hidden states are wanted; the result is one Event(None) after
    `hidden` (float32 [n, d]) is set."""

    def __init__(self, tokens, on_event: Callable = None):
        super().__init__(tokens, [None], on_event)
        self.hidden = None


@dataclass
class _Slot:
    index: int
    tokens: list = field(default_factory=list)   # ids whose keys and values the slot holds, in order
    last_used: float = 0.0
    busy: bool = False
    prompt_logits: Optional[tuple] = None          # (n, the logits after tokens[:n]) of its last prompt


@dataclass
class _Answer:
    choice: int
    generation: Generation
    slot: _Slot
    next_token: Optional[int] = None            # chosen, to be evaluated at the next step


@dataclass
class _Active:
    """A request holding slots: reading its prompt into slots[0] (pending), then its answers decode."""

    request: Request
    slots: list
    pending: list
    answers: list = field(default_factory=list)
    known_logits: Optional[np.ndarray] = None    # the prompt was in the slot with its logits: none pending


class Scheduler:
    """Continuous batching on one LLM (see the module docstring).

    token_budget: tokens per forward pass (answers' next tokens first, then prompt chunks).
    cache_bytes: RAM for prefixes that slots lose (0: none kept).
    max_waiting: requests that may wait for slots; beyond it submit raises SchedulerFullError.
    """

    MIN_KEPT_PREFIX = 32   # shorter prefixes are not worth the RAM or the copy
    MIN_COPIED_GAIN = 16   # copy another slot's prefix when it spares at least this many tokens

    def __init__(self, llm, token_budget: int = None, cache_bytes: int = 0, max_waiting: int = 64):
        self.llm = llm
        self.token_budget = token_budget or llm.config.batch_size
        if self.token_budget < 1:
            raise ValueError(f"token_budget must be positive, got {self.token_budget}")
        self.cache_bytes, self.max_waiting = cache_bytes, max_waiting
        self.slots = [_Slot(i) for i in range(llm.model.n_seqs)]
        self.slots[0].tokens = list(llm.tokens)   # what the single-sequence API left in sequence 0
        self._waiting, self._active = [], []
        self._kept = OrderedDict()                 # tuple of tokens -> the caches' bytes, oldest first
        self._kept_bytes = 0
        self._work = threading.Condition()
        self._stopping = False

    # -- any thread ---------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        """Queue `request`. A prompt that cannot fit the context, or more answers than slots, fail at once."""
        n_ctx = self.llm.context_length
        room = n_ctx + 1 if isinstance(request, EmbeddingRequest) else n_ctx   # an answer needs a position
        if len(request.prompt) >= room:
            raise ContextOverflowError(f"the prompt has {len(request.prompt)} tokens; the context length is "
                                       f"{n_ctx}: shorten it or load with a larger context_length")
        if len(request.generations) > len(self.slots):
            raise ValueError(f"{len(request.generations)} answers at once need as many KV cache sequences, and the "
                             f"model holds {len(self.slots)}: load it with sequences={len(request.generations)}")
        with self._work:
            if len(self._waiting) >= self.max_waiting:
                raise SchedulerFullError(f"{len(self._waiting)} requests are already waiting for the model; "
                                         f"retry later")
            self._waiting.append(request)
            self._work.notify()
        return request

    def stop(self):
        """End `serve` after the step in progress."""
        with self._work:
            self._stopping = True
            self._work.notify()

    # -- the thread that owns the model -------------------------------------------------------
    def serve(self):
        """Step while there is work and sleep while there is none, until `stop`."""
        while True:
            with self._work:
                while not (self._waiting or self._active or self._stopping):
                    self._work.wait()
                if self._stopping:
                    return
            self.step()

    def drive(self, requests=()):
        """Submit `requests`, then step in this thread until every request is done, yielding after
        each step (its events have been reported); sequence 0 is then left to the single-sequence
        API with what it holds."""
        for request in requests:
            self.submit(request)
        try:
            while self.step():
                yield
        finally:
            with self.llm._lock:
                self.llm.tokens = list(self.slots[0].tokens)

    def run(self, requests=()) -> list:
        """drive(requests) to the end; the requests."""
        requests = list(requests)
        for _ in self.drive(requests):
            pass
        return requests

    def step(self) -> bool:
        """One forward pass over every answer's next token and chunks of prompts; False when idle."""
        with self.llm._lock:
            self._adopt_sequence_zero()
            with self._work:
                self._drop_cancelled()
                self._admit()
            if not self._active:
                return False
            for active in [a for a in self._active if a.known_logits is not None]:
                logits, active.known_logits = active.known_logits, None
                self._guarded(active, self._start_answers, None, logits)
            tokens, places, reads = self._plan()
            if tokens:
                try:
                    rows = self.llm.model.forward(np.array(tokens, np.int32), Batch(*places), [r for r, _ in reads])
                except Exception as exc:   # noqa: BLE001 - the requests in this pass fail, the scheduler goes on
                    for active in list(self._active):
                        self._end(active, exc)
                    return True
                for (_, (active, answer)), logits in zip(reads, rows):
                    self._guarded(active, self._start_answers if answer is None else self._advance, answer, logits)
            self._embed_ready()
            return True

    def _adopt_sequence_zero(self):
        """Sequence 0 is also the single-sequence API's (`LLM.eval`): take over what it left there, and
        make that API start over, since this scheduler now writes the sequence."""
        if self.llm.tokens and not self.slots[0].busy:
            self.slots[0].tokens = list(self.llm.tokens)
        self.llm.reset()

    def _guarded(self, active, advance, answer, logits):
        """advance(active, answer, logits); an error in one request's sampling ends that request only."""
        try:
            advance(active, answer, logits)
        except Exception as exc:   # noqa: BLE001
            if active in self._active:
                self._end(active, exc)

    # -- admission ----------------------------------------------------------------------------
    def _drop_cancelled(self):
        """Cancelled requests end, with their last event: waiting ones at once, running ones freeing their slots."""
        for request in [r for r in self._waiting if r.cancelled.is_set()]:
            self._waiting.remove(request)
            request.on_event(Event(None))
            request.done.set()
        for active in [a for a in self._active if a.request.cancelled.is_set()]:
            self._end(active)

    def _admit(self):
        """Give waiting requests slots, in arrival order, while there are enough free slots."""
        while self._waiting:
            request = self._waiting[0]
            free = [s for s in self.slots if not s.busy]
            if len(free) < len(request.generations):
                return
            self._waiting.pop(0)
            first = max(free, key=lambda s: (_shared(s.tokens, request.prompt), -s.last_used))
            others = sorted((s for s in free if s is not first), key=lambda s: s.last_used)
            slots = [first] + others[:len(request.generations) - 1]
            for slot in slots:
                slot.busy = True
            if isinstance(request, EmbeddingRequest):   # all its hidden states are wanted: read it whole
                self._keep(first, 0)
                first.tokens = []
                shared = 0
            else:
                shared = self._reuse(first, request.prompt)
            for slot in slots[1:]:
                self._keep(slot, 0)
                slot.tokens = []
            active = _Active(request, slots, request.prompt[shared:])
            if not active.pending:
                active.known_logits = first.prompt_logits[1].copy()
            self._active.append(active)

    def _reuse(self, slot, prompt) -> int:
        """Prepare `slot` for `prompt`: put there the longest prefix of it that the slot, another
        slot or the RAM cache holds; the number of prompt tokens then in the slot: all of them if
        the slot also kept the logits after them, else at most len(prompt) - 1 (the last one is
        evaluated again for its logits)."""
        held = _shared(slot.tokens, prompt)
        if slot.prompt_logits is not None and slot.prompt_logits[0] == len(prompt) == held:
            self._keep(slot, held)
            del slot.tokens[held:]
            return held
        slot.prompt_logits = None   # the slot's tokens change: logits kept for them would be stale
        most = len(prompt) - 1
        shared = min(held, most)
        other = max((s for s in self.slots if s is not slot), key=lambda s: _shared(s.tokens, prompt), default=None)
        copied = min(_shared(other.tokens, prompt), most) if other is not None else 0
        kept = max(self._kept, key=lambda tokens: _shared(tokens, prompt), default=None)
        restored = min(_shared(kept, prompt), most) if kept is not None else 0
        if copied >= max(restored, shared + self.MIN_COPIED_GAIN):
            self._keep(slot, 0)
            self.llm.model.copy_sequence(other.index, slot.index, copied)
            slot.tokens, shared = prompt[:copied], copied
        elif restored > max(shared, self.MIN_KEPT_PREFIX - 1):
            self._keep(slot, 0)
            self.llm.model.write_sequence(slot.index, self._kept[kept])
            self._kept.move_to_end(kept)
            slot.tokens, shared = list(kept), restored
        else:
            self._keep(slot, shared)
        del slot.tokens[shared:]
        return shared

    def _keep(self, slot, keep: int):
        """Before `slot` loses its tokens after the first `keep`, save them to RAM if worth it."""
        if not self.cache_bytes or len(slot.tokens) < max(keep + 1, self.MIN_KEPT_PREFIX):
            return
        key = tuple(slot.tokens)
        if key in self._kept:
            self._kept.move_to_end(key)
            return
        data = self.llm.model.read_sequence(slot.index, len(key))
        size = sum(part.nbytes for part in data)
        if size > self.cache_bytes:
            return
        while self._kept_bytes + size > self.cache_bytes:
            _, dropped = self._kept.popitem(last=False)
            self._kept_bytes -= sum(part.nbytes for part in dropped)
        self._kept[key] = data
        self._kept_bytes += size

    # -- one pass -----------------------------------------------------------------------------
    def _plan(self):
        """(tokens, (positions, sequences), reads) of this pass; reads: (row, (active, answer or
        None for a prompt just read in full)) for the rows whose logits are wanted."""
        tokens, positions, seqs, reads = [], [], [], []

        def place(slot, ids):
            positions.extend(range(len(slot.tokens), len(slot.tokens) + len(ids)))
            seqs.extend([slot.index] * len(ids))
            tokens.extend(ids)
            slot.tokens.extend(ids)

        for active in self._active:
            for answer in active.answers:
                if answer.next_token is not None:
                    reads.append((len(tokens), (active, answer)))
                    place(answer.slot, [answer.next_token])
                    answer.next_token = None
        budget = self.token_budget - len(tokens)
        for active in self._active:
            if active.pending and budget > 0 and not isinstance(active.request, EmbeddingRequest):
                chunk, active.pending = active.pending[:budget], active.pending[budget:]
                place(active.slots[0], chunk)
                budget -= len(chunk)
                if not active.pending:
                    reads.append((len(tokens) - 1, (active, None)))
        return tokens, (positions, seqs), reads

    def _start_answers(self, active, _, logits):
        """The prompt is in: share it with every answer's slot, and take each answer's first step."""
        first = active.slots[0]
        first.prompt_logits = (len(first.tokens), np.array(logits))   # a copy: sampling may write to logits
        for choice, (generation, slot) in enumerate(zip(active.request.generations, active.slots)):
            if slot is not first:
                self.llm.model.copy_sequence(first.index, slot.index, len(first.tokens))
                slot.tokens, slot.prompt_logits = list(first.tokens), first.prompt_logits
            answer = _Answer(choice, generation, slot)
            active.answers.append(answer)
        for answer in list(active.answers):
            self._advance(active, answer, logits)

    def _advance(self, active, answer, logits):
        """Answer's next step from its logits; the request ends when its last answer does."""
        step = answer.generation.step(logits)
        if not answer.generation.finished and len(answer.slot.tokens) >= self.llm.context_length:
            active.request.on_event(Event(answer.choice, step))
            step = answer.generation.finish("length")   # no room for the next token
        active.request.on_event(Event(answer.choice, step))
        if answer.generation.finished:
            self._release(answer.slot)
        else:
            answer.next_token = step.token
        if active in self._active and all(a.generation.finished for a in active.answers):
            self._end(active)

    def _embed_ready(self):
        """Embedding requests holding a slot: their hidden states, in passes of their own."""
        for active in [a for a in self._active if isinstance(a.request, EmbeddingRequest)]:
            slot, ids, size = active.slots[0], active.pending, self.token_budget
            try:
                states = [self.llm.model.hidden_states(np.array(ids[i:i + size], np.int32),
                                                        Batch.of(i, len(ids[i:i + size]), slot.index))
                          for i in range(0, len(ids), size)]
                slot.tokens = list(ids)
                active.request.hidden = np.concatenate(states)
                self._end(active)
            except Exception as exc:   # noqa: BLE001 - this request fails, the others go on
                self._end(active, exc)

    def _release(self, slot):
        slot.busy = False
        slot.last_used = time.perf_counter()

    def _end(self, active, error=None):
        for slot in active.slots:
            if slot.busy:
                self._release(slot)
            if error is not None:
                slot.tokens = []   # what the failed pass left in the slot is unknown
        self._active.remove(active)
        active.request.error = error
        active.request.on_event(Event(None, error=error))
        active.request.done.set()


def _shared(a, b) -> int:
    """How many leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
