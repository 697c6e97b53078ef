"""Runtime: run a model from an expert store with an LRU cache of full-depth experts."""

from .cache import CacheStats, ExpertCache
from .runtime import RoutingEvent, Runtime, RuntimeConfig

__all__ = ["CacheStats", "ExpertCache", "RoutingEvent", "Runtime", "RuntimeConfig"]
