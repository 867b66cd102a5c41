"""Exceptions zephyr raises. Every one says what went wrong, where, and what to do."""


class ZephyrError(Exception):
    """Base class of zephyr's own errors."""


class GGUFError(ZephyrError, ValueError):
    """A GGUF file is malformed or uses something zephyr does not support."""

    def __init__(self, message, path=None, offset=None):
        where = []
        if path is not None:
            where.append(str(path))
        if offset is not None:
            where.append(f"byte offset {offset}")
        self.path = path
        self.offset = offset
        self.reason = message
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")


class TokenizerError(ZephyrError, ValueError):
    """The model's vocabulary cannot be turned into a tokenizer."""


class ChatTemplateError(ZephyrError, ValueError):
    """A chat template is missing, invalid, or failed while rendering."""


class BackendError(ZephyrError, RuntimeError):
    """A backend is missing, unavailable, incompatible, or cannot run an operation."""


class ContextOverflowError(ZephyrError, ValueError):
    """The tokens to evaluate do not fit in the model's context window."""


class DemoModelError(ZephyrError, RuntimeError):
    """The demo model could not be fetched or verified."""


class InvalidRequestError(ZephyrError, ValueError):
    """A field of an OpenAI-style request has a value zephyr cannot use; `param` names the field."""

    def __init__(self, message, param):
        super().__init__(message)
        self.param = param


class MissingDependencyError(ZephyrError, ImportError):
    """A feature needs an optional dependency that is not installed; the message names the extra."""
