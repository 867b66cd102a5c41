"""CUDA-graph decode: the decode step of a run of consecutive GPU layers, captured once and replayed.

`LlamaModel.forward` calls `decoder_layer` once per layer. For a decode batch (n <= 8 tokens: one
token of one sequence, or one of each of several) every call launches a dozen small kernels;
launched one by one from Python they would cap the token rate, so:

1. Record: an eager decode step notes the layers it runs, in order. A call continues the run when
   its input is the previous call's output and its batch the same; any other call starts a new run,
   which completes the one before.
2. Capture: when a step of n tokens starts with the first layer of a completed run of n tokens, the
   run's kernels (all layers, the backend's `layer_decode`) are captured on the backend's stream
   into one graph, reading from a fixed input buffer, writing each layer's output to a fixed buffer,
   and reading the tokens' positions and sequences from the backend's device batch arrays, so one
   graph serves every batch of n tokens: any sequences, any positions.
3. Replay: that first call copies its input into the graph's input buffer, writes the batch and
   launches the graph, which computes every layer of the run; it returns layer 0's output buffer.
   Each following call whose input is the previous layer's buffer, with the same batch, gets its
   own buffer back at once.

Graphs are kept per batch size n. A call that does not match (other weights, another input,
another batch) leaves the replay: it runs eagerly, and that graph is dropped so the next step
records afresh. Cache rows the graph wrote ahead for layers that were then run eagerly are
overwritten before anything reads them (a step writes its tokens' rows of the cache before
attending over them).

Outputs of a replayed step live in the graph's buffers: they stay valid until the next replay of
that graph.
"""
from dataclasses import dataclass


@dataclass(frozen=True, eq=False)
class LayerCall:
    """What one decoder_layer call computes, apart from its input and batch."""

    weights: object   # LayerWeights of device weights
    params: object    # LayerParams
    cache: object     # CudaKVCache
    layer: int        # layer index in the cache

    def same(self, other) -> bool:
        return (self.weights is other.weights and self.cache is other.cache and self.layer == other.layer
                and (self.params is other.params or self.params == other.params))


@dataclass(eq=False)
class _Captured:
    """A captured run of layers for batches of n tokens, and its buffers."""

    graph: object
    calls: tuple     # LayerCalls, in order
    input: object    # [n, d]
    outputs: list    # [n, d] per layer


class DecodeGraphs:
    """Record, capture and replay decode runs for one backend (see the module docstring).

    The backend provides: `stream`, `cp`, `layer_decode(x, out, call)`, `scratch(n, call)` and
    `_set_batch(batch)`.
    """

    def __init__(self, backend):
        self._backend = backend
        self._recording = []      # LayerCalls of the eager run in progress
        self._last_out = None     # its last output, and its batch
        self._last_batch = None
        self._complete = {}       # n -> the last completed run of n-token batches
        self._graphs = {}         # n -> _Captured
        self._replaying = None    # the _Captured whose step is under way
        self._next = None         # index in its calls of the next call of that step
        self._replay_batch = None
        self.replays = 0          # steps served by a graph (for tests and benchmarks)

    def graph(self, n: int = 1):
        """The graph captured for n-token batches, or None (benchmarks replay it alone to time the GPU side)."""
        captured = self._graphs.get(n)
        return captured.graph if captured else None

    def follow(self, x, weights, params, cache, layer, batch):
        """The output of a layer of the step being replayed, if this call is that layer's (the
        hot path: identity checks only, before the backend checks any argument); else None."""
        i, captured = self._next, self._replaying
        if i is None or i >= len(captured.calls):
            return None
        expected = captured.calls[i]
        if (x is captured.outputs[i - 1] and weights is expected.weights and cache is expected.cache
                and layer == expected.layer and params is expected.params
                and (batch is self._replay_batch or batch == self._replay_batch)):
            self._next = i + 1
            return captured.outputs[i]
        return None

    def run(self, x, call: LayerCall, batch):
        """The output of `call` on x from a graph, or None: then the caller runs it eagerly and
        reports the result through `record`."""
        if self._next is not None:
            if self._next < len(self._replaying.calls):   # the caller left the captured run half way
                self._graphs = {n: c for n, c in self._graphs.items() if c is not self._replaying}
            self._next = self._replaying = None
        if x is self._last_out and batch == self._last_batch:
            return None   # continues the eager run being recorded
        if self._recording:
            self._complete[len(self._last_batch)] = tuple(self._recording)
            self._recording = []
        n = len(batch)
        captured = self._graphs.get(n)
        if captured is None or not captured.calls[0].same(call):
            complete = self._complete.get(n)
            if not (complete and complete[0].same(call)):
                return None
            captured = self._graphs[n] = self._capture(n, complete)
        return self._replay(captured, x, batch)

    def record(self, call: LayerCall, out, batch):
        """Note an eagerly run decode call (after `run` returned None for it, which has already
        closed the previous run unless this call continues it)."""
        self._recording.append(call)
        self._last_out, self._last_batch = out, batch

    def _capture(self, n, calls) -> _Captured:
        b = self._backend
        cp = b.cp
        width = calls[0].weights.wq.cols
        with b.stream:
            for call in calls:
                b.scratch(n, call)   # every buffer the kernels touch exists before capture starts
            source = cp.empty((n, width), dtype=cp.float32)
            outputs = [cp.empty((n, width), dtype=cp.float32) for _ in calls]
            b.stream.begin_capture()
            try:
                x = source
                for call, out in zip(calls, outputs):
                    b.layer_decode(x, out, call)
                    x = out
            finally:
                graph = b.stream.end_capture()
        return _Captured(graph, calls, source, outputs)

    def _replay(self, captured, x, batch):
        b = self._backend
        with b.stream:
            b.cp.copyto(captured.input, x)
            b._set_batch(batch)
            captured.graph.launch(stream=b.stream)
        self._replaying, self._next, self._replay_batch = captured, 1, batch
        self._last_out = None
        self.replays += 1
        return captured.outputs[0]
