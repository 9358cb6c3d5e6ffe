"""Small shared helpers."""

from .io import atomic_write, atomic_write_text, remove_orphaned_temporary_files

__all__ = ["atomic_write", "atomic_write_text", "remove_orphaned_temporary_files"]
