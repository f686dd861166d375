"""Per-architecture adapters.  Importing this package registers every adapter."""
from .base import ArchAdapter, BlockSites, Site, adapter_for, get_module, registered
from . import llava, qwen2_5_vl  # noqa: F401  (registration side effect)

__all__ = ["ArchAdapter", "BlockSites", "Site", "adapter_for", "get_module", "registered"]
