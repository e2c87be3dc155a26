"""LLaMA configurations shipped as JSON (GaLore's 60M..7B plus 9M and 20M for CPU runs)."""

__all__: list[str] = []
