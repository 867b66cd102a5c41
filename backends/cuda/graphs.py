"""CUDA-graph decode: the decode step of a run of consecutive GPU layers, captured once and replayed.

`LlamaModel.forward` calls `decoder_layer` once per layer. For one decode token (n = 1) every call
launches a dozen small kernels; launched one by one from Python they would cap the token rate, so:

1. Record: an eager decode step notes the layers it runs, in order. A call continues the run when
   its input is the previous call's output at the same position; any other call starts a new run,
   which completes the one before.
2. Capture: when a step starts with the first layer of a completed run, the run's kernels (all
   layers, the backend's `layer_decode`) are captured on the backend's stream into one graph,
   reading from a fixed input buffer, writing each layer's output to a fixed buffer, and reading
   the start position from a one-element device array, so one graph serves every position.
3. Replay: that first call copies its input into the graph's input buffer, writes the position and
   launches the graph, which computes every layer of the run; it returns layer 0's output buffer.
   Each following call whose input is the previous layer's buffer gets its own buffer back at once.

A call that does not match (other weights, another input, another position) leaves the replay:
it runs eagerly, and the graph is dropped so the next step records afresh. Positions the graph
wrote ahead for layers that were then run eagerly are overwritten before anything reads them (a
step writes its position of the cache before attending over it).

Outputs of a replayed step live in the graph's buffers: they stay valid until the next replay.
"""
from dataclasses import dataclass


@dataclass(frozen=True, eq=False)
class LayerCall:
    """What one decoder_layer call computes, apart from its input and position."""

    weights: object   # LayerWeights of device weights
    params: object    # LayerParams
    cache: object     # KVCache
    layer: int        # layer index in the cache

    def same(self, other) -> bool:
        return (self.weights is other.weights and self.cache is other.cache and self.layer == other.layer
                and (self.params is other.params or self.params == other.params))


class DecodeGraphs:
    """Record, capture and replay decode runs for one backend (see the module docstring).

    The backend provides: `stream`, `cp`, `layer_decode(x, out, call)`, `scratch(n, call)` and
    `_set_position(start_pos)`.
    """

    def __init__(self, backend):
        self._backend = backend
        self._recording = []      # LayerCalls of the eager run in progress
        self._last_out = None     # its last output
        self._last_pos = None
        self._complete = ()       # the last completed run
        self._graph = None        # the captured graph, its run and buffers
        self._graph_run = ()
        self._input = None
        self._outputs = []
        self._next = None         # index in _graph_run of the next call of a replayed step
        self._replay_pos = None
        self.replays = 0          # steps served by the graph (for tests and benchmarks)

    @property
    def graph(self):
        """The captured graph (None before a capture): benchmarks replay it alone to time the GPU side."""
        return self._graph

    def follow(self, x, weights, params, cache, layer, start_pos):
        """The output of a layer of the step being replayed, if this call is that layer's (the
        hot path: identity checks only, before the backend checks any argument); else None."""
        i = self._next
        if i is None or i >= len(self._graph_run):
            return None
        expected = self._graph_run[i]
        if (x is self._outputs[i - 1] and weights is expected.weights and cache is expected.cache
                and layer == expected.layer and params is expected.params and start_pos == self._replay_pos):
            self._next = i + 1
            return self._outputs[i]
        return None

    def run(self, x, call: LayerCall, start_pos: int):
        """The output of `call` on x from a graph, or None: then the caller runs it eagerly and
        reports the result through `record`."""
        if self._next is not None:
            if self._next < len(self._graph_run):
                self._drop_graph()   # the caller left the captured run half way
            self._next = None
        if x is self._last_out and start_pos == self._last_pos:
            return None   # continues the eager run being recorded
        if self._recording:
            self._complete = tuple(self._recording)
            self._recording = []
        if not (self._graph is not None and self._graph_run[0].same(call)):
            if not (self._complete and self._complete[0].same(call)):
                return None
            self._capture(self._complete)
        return self._replay(x, start_pos)

    def record(self, call: LayerCall, out, start_pos: int):
        """Note an eagerly run decode call (after `run` returned None for it, which has already
        closed the previous run unless this call continues it)."""
        self._recording.append(call)
        self._last_out, self._last_pos = out, start_pos

    def _capture(self, calls):
        b = self._backend
        cp = b.cp
        self._drop_graph()
        width = calls[0].weights.wq.cols
        with b.stream:
            for call in calls:
                b.scratch(1, call)   # every buffer the kernels touch exists before capture starts
            self._input = cp.empty((1, width), dtype=cp.float32)
            self._outputs = [cp.empty((1, width), dtype=cp.float32) for _ in calls]
            b.stream.begin_capture()
            try:
                source = self._input
                for call, out in zip(calls, self._outputs):
                    b.layer_decode(source, out, call)
                    source = out
            finally:
                graph = b.stream.end_capture()
        self._graph, self._graph_run = graph, calls

    def _replay(self, x, start_pos):
        b = self._backend
        with b.stream:
            b.cp.copyto(self._input, x)
            b._set_position(start_pos)
            self._graph.launch(stream=b.stream)
        self._next, self._replay_pos = 1, start_pos
        self._last_out = None
        self.replays += 1
        return self._outputs[0]

    def _drop_graph(self):
        self._graph, self._graph_run, self._input, self._outputs = None, (), None, []
