"""tillsync register agent: SQLite outbox, catalog replica, RabbitMQ link, local socket for
POS apps."""

__version__ = "0.1.0"

from .catalog_events import CatalogEvent, CatalogSubscription
from .catalog_reader import CatalogEntry, Price
from .catalog_sync import NotConnectedError, SyncBusyError, SyncProgress, SyncReport
from .outbox import Counts, Submitted
from .replica import Replica, UnknownItemError
from .service import Agent
from .settings import AgentSettings, load_settings

__all__ = [
    "Agent",
    "AgentSettings",
    "CatalogEntry",
    "CatalogEvent",
    "CatalogSubscription",
    "Counts",
    "NotConnectedError",
    "Price",
    "Replica",
    "Submitted",
    "SyncBusyError",
    "SyncProgress",
    "SyncReport",
    "UnknownItemError",
    "__version__",
    "load_settings",
]
