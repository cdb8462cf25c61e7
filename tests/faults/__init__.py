"""Fault-injection tools for tests that start real services (STYLE rule 11)."""

from .proxy import Direction, FaultProxy

__all__ = ["Direction", "FaultProxy"]
