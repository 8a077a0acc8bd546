"""The test suite by area: core, storage, ledgers, providers, edge, face; support: fakes."""
