"""Small shared helpers."""

from .io import atomic_write, atomic_write_text

__all__ = ["atomic_write", "atomic_write_text"]
