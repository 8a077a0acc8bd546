"""Ledgers: providers that keep usage themselves (embedded SQLite, Redis)."""

from .base import FeatureUsage, Ledger

__all__ = ["FeatureUsage", "Ledger"]
