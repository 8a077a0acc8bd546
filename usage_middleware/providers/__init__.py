"""Billing providers: the base contract and the remote providers (Tier, Spaire, ARES)."""

from .base import FailurePolicy, Provider, ProviderState

__all__ = ["FailurePolicy", "Provider", "ProviderState"]
