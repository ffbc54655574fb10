"""LLM gateway built around a durable task queue."""

__version__ = "0.1.0"
