"""What one server process runs: which model, how to load it, how to serve it.

`zephyr serve` turns its options into a ServerSpec in one place (`zephyr.cli.server_spec`); whatever
serves it — uvicorn in the command's own process, or every Ray Serve replica — loads the model and
builds the app from the spec, so each option reaches each replica the same way. Plain data: it is
pickled to the replicas as it is.
"""
from dataclasses import dataclass, field

from .app import create_app


@dataclass(frozen=True)
class ServerSpec:
    model: str                                          # a .gguf path, a directory, a Hugging Face repo id, or "demo"
    load_options: dict = field(default_factory=dict)    # AutoModelForCausalLM.from_pretrained keyword arguments
    app_options: dict = field(default_factory=dict)     # create_app keyword arguments

    def load(self):
        """The loaded model (a zephyr.LLM); the caller closes it."""
        from ..llm import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(self.model, **self.load_options)

    def create_app(self, llm, **more_options):
        """The server app for `llm`, with this spec's app options and `more_options`."""
        return create_app(llm, **self.app_options, **more_options)
