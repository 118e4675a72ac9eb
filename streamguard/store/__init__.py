from .sqlite import AsyncStore, Store

__all__ = ["AsyncStore", "Store"]
