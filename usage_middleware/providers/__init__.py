"""Billing providers: the base contract and the remote providers (Tier, Spaire, ARES)."""

from ..provider import FailurePolicy, Provider, ProviderState
from .ares import AresProvider
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
