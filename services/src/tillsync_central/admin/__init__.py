"""Central's admin HTTP API and operations dashboard (``docs/admin.md``): Starlette and
Jinja2 over asyncpg and the RabbitMQ management API, served by uvicorn."""

from .app import AdminServer, create_app
from .operators import ROLES, Operator, Role, add_operator, list_operators

__all__ = [
    "ROLES",
    "AdminServer",
    "Operator",
    "Role",
    "add_operator",
    "create_app",
    "list_operators",
]
