"""Checkpoint -> expert store (`python -m extractor`), and the store reader the runtime uses."""

from .errors import ExtractError
from .extract import ExtractSummary, extract_store, verify_store

__all__ = ["ExtractError", "ExtractSummary", "extract_store", "verify_store"]
