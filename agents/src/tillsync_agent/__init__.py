"""tillsync register agent: SQLite outbox, RabbitMQ link, local socket for POS apps."""

__version__ = "0.1.0"

from .outbox import Counts, Submitted
from .service import Agent
from .settings import AgentSettings, load_settings

__all__ = ["Agent", "AgentSettings", "Counts", "Submitted", "__version__", "load_settings"]
