"""tillsync central: ingest, catalog relay and RPC, presence and the admin API.

Settings are built once at the edge (``tillsync-central`` CLI) and passed down; the
database layer lives in :mod:`tillsync_central.db`.
"""

from .settings import CentralSettings, load_settings, redact_url

__version__ = "0.1.0"

__all__ = ["CentralSettings", "load_settings", "redact_url"]
