"""Integrations with training frameworks (Hugging Face Trainer and accelerate)."""

__all__: list[str] = []
