"""Fakes and helpers the tests share (import them as ``tests.support.<module>``).

The provider doubles, one per seam (each is the only one of its kind):

* ``metering_helpers.RecordingProvider``: in-memory balances with real holds, every
  reserve/prepare/commit/release recorded; the edge suites (middleware, decorator, uvicorn).
* ``reporter_fakes.FakeProvider``: a deduplicating delivery sink with a failure script
  (503, 429, 422, hang) for the Reporter; ``reporter_fakes.OutboxedProvider``: allows every
  request and charges through a Reporter into a sink, as a remote provider does.
* ``contract_fake_remote.FakeRemote``: a ``RemoteProvider`` over two dicts (the remote base's
  cache, accounting and breaker under test).
* ``tier_fake``, ``spaire_fake``, ``ares_fake``: the services' HTTP APIs in process
  (``httpx.MockTransport``), answering as ``/work/shared/reference`` says.

Also: ``backends`` (the one registry of ledgers and providers the contract suites run
over), ``contract_*`` (one provider each), ``redis_server`` (a redis-server per test or per
process), ``waiting.eventually`` (wait on a condition with a deadline).
``reporter_fakes``, ``tier_fake`` and ``ares_fake`` import nothing from ``tests``: child
processes and ``bench/`` put this folder on ``sys.path`` and import them by bare name.
"""
