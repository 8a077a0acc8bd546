"""Ledgers: providers that keep usage themselves (embedded SQLite, Redis)."""

from .base import FeatureUsage, Ledger
from .local import LocalLedger

__all__ = ["FeatureUsage", "Ledger", "LocalLedger"]
