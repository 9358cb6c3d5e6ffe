"""Small data structures shared by the data pipeline and the model."""

from .image_batch import batch_images

__all__ = ["batch_images"]
