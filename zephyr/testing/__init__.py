"""Test and benchmark scaffolding: synthetic GGUF models, the GGUF writer, the SentencePiece
vocabulary reader and random quant blocks. No runtime path imports this package."""
