"""Fakes and helpers the tests share: in-process provider fakes (Tier, Spaire, ARES), the
recording providers, the redis-server fixture, and the registry of backends the contract
suites run over (:mod:`tests.support.backends`)."""
