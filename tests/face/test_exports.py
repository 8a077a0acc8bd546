"""The public surface: every public name is exported, sorted, and importable."""

import importlib
import inspect

import usage_middleware

PUBLIC_MODULES = [
    "usage_middleware.errors",
    "usage_middleware.customers",
    "usage_middleware.decorator",
    "usage_middleware.middleware",
]


def test_all_is_sorted_and_importable() -> None:
    """__all__ is sorted (isort style) and every name in it resolves."""

    def isort_key(name: str) -> tuple[int, str]:
        # ruff's RUF022 order: CONSTANTS, then Classes, then functions.
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert usage_middleware.__all__ == sorted(usage_middleware.__all__, key=isort_key)
    for name in usage_middleware.__all__:
        if name == "RedisLedger":
            continue  # needs the [redis] extra; covered by the Redis tests
        assert getattr(usage_middleware, name) is not None


def test_public_classes_of_core_modules_are_exported() -> None:
    """Every public exception, middleware, decorator and resolver is re-exported at top level."""
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                if name in {"MeteringState", "CustomerResolver", "UnitsFunction"}:
                    continue
                assert name in usage_middleware.__all__, f"{module_name}.{name} is not exported"


def test_unknown_attribute_raises() -> None:
    """Asking the package for a name it does not have is an AttributeError."""
    try:
        usage_middleware.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")
