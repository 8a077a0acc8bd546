"""Billing providers: the base contract and the remote providers (Tier, Spaire, ARES)."""

from .ares import AresProvider
from .base import FailurePolicy, Provider, ProviderState
from .remote import Entitlement, RemoteProvider
from .spaire import SpaireProvider
from .tier import TierProvider

__all__ = [
    "AresProvider",
    "Entitlement",
    "FailurePolicy",
    "Provider",
    "ProviderState",
    "RemoteProvider",
    "SpaireProvider",
    "TierProvider",
]
