"""Canonical view of supported architectures (weights in ``(out, in)`` orientation under ``layers.{l}.*`` names)."""

from .view import SUPPORTED_MODEL_TYPES, MatrixRef, ModelView, family_of, is_conv1d, unwrap

__all__ = ["SUPPORTED_MODEL_TYPES", "MatrixRef", "ModelView", "family_of", "is_conv1d", "unwrap"]
