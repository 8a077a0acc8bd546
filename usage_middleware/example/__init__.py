"""The example app the demo serves, shipped in the package so ``usage-middleware demo`` runs
from any directory: ``fastapi_app.py`` (needs the ``fastapi`` extra) and ``pricing.json``.

They are byte-for-byte the repository's ``examples/fastapi_app.py`` and
``examples/pricing.json`` (a test checks it): edit both together.
"""
