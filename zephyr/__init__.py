"""zephyr: run GGUF language models from Python.

    from zephyr import AutoModelForCausalLM
    llm = AutoModelForCausalLM.from_pretrained("model.gguf", gpu_layers=0)
    print(llm("The capital of France is"))
"""
from .config import Config, ModelConfig
from .demo import demo_model_path
from .errors import (BackendError, ChatTemplateError, ContextOverflowError, DemoModelError, GGUFError,
                     InvalidRequestError, TokenizerError, ZephyrError)
from .generation import Generation, GenerationSettings
from .grammar import Grammar
from .llm import LLM, AutoModelForCausalLM
from .memory import InsufficientMemoryError
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = ["AutoModelForCausalLM", "LLM", "Config", "ModelConfig", "Tokenizer", "demo_model_path",
           "Generation", "GenerationSettings", "Grammar", "InvalidRequestError",
           "ZephyrError", "GGUFError", "TokenizerError", "ChatTemplateError", "BackendError",
           "ContextOverflowError", "DemoModelError", "InsufficientMemoryError"]
