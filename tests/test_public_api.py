"""The public surface: errors exported, every module documented with __all__."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import service
import validators
from validators import errors


def test_every_error_class_is_exported_from_the_package() -> None:
    classes = {
        name
        for name, value in vars(errors).items()
        if inspect.isclass(value) and issubclass(value, errors.AuthError)
    }
    assert classes <= set(validators.__all__)
    assert classes == set(errors.__all__)


def test_every_error_code_is_unique_and_statuses_are_http_errors() -> None:
    classes = [getattr(errors, name) for name in errors.__all__]
    codes = [cls.code for cls in classes if cls is not errors.AuthError]
    assert len(codes) == len(set(codes))
    assert all(400 <= cls.status < 600 for cls in classes)


@pytest.mark.parametrize(
    "module_name",
    sorted(
        f"{package.__name__}.{info.name}"
        for package in (service, validators)
        for info in pkgutil.iter_modules(package.__path__)
        if info.name != "__main__"
    ),
)
def test_every_module_has_a_docstring_and_all(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert module.__doc__ and module.__doc__.strip()
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, tuple)
    assert all(hasattr(module, name) for name in exported)
