"""The walk every backend's error-boundary test makes: each client exception, raised through the
backend's ``_map_errors()``, must come out as an infeed error caused by it."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Iterable
from contextlib import AbstractContextManager
from types import ModuleType
from typing import Any

import pytest

from infeed.errors import InfeedError, TopicNotFoundError


def client_exceptions(modules: Iterable[ModuleType], packages: Collection[str]) -> list[type[BaseException]]:
    """The exception classes ``modules`` export that are defined under one of ``packages``, sorted."""
    found = {
        cls
        for module in modules
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, BaseException)
        and any(cls.__module__ == p or cls.__module__.startswith(f"{p}.") for p in packages)
    }
    return sorted(found, key=exception_id)


def exception_id(cls: type[BaseException]) -> str:
    """A test id for an exception class: its dotted name."""
    return f"{cls.__module__}.{cls.__name__}"


def build_exception(cls: type[BaseException], *arg_sets: tuple[Any, ...]) -> BaseException:
    """An instance of ``cls`` from the first of ``arg_sets`` its constructor takes."""
    for args in arg_sets:
        try:
            return cls(*args)
        except (TypeError, ValueError):
            continue
    raise AssertionError(f"cannot build {cls.__name__} from any of {arg_sets}")


def raise_through(boundary: AbstractContextManager[object], exc: BaseException, where: str) -> InfeedError:
    """Raise ``exc`` inside ``boundary`` and return the infeed error it became.

    Checks that the error is in the infeed tree, is raised ``from`` ``exc`` and names ``where``.
    """
    with pytest.raises(InfeedError) as info, boundary:
        raise exc
    assert info.value.__cause__ is exc
    assert where in str(info.value)
    return info.value


def assert_passes_through(boundary: Callable[..., AbstractContextManager[object]], *args: str) -> None:
    """An infeed error and an unrelated error (a bug) leave ``boundary(*args)`` unchanged."""
    for exc in (TopicNotFoundError("no topic"), KeyError("a bug stays a bug")):
        with pytest.raises(type(exc)) as info, boundary(*args):
            raise exc
        assert info.value is exc
