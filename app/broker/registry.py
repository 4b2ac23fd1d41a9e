"""Brokers by name: `Settings.broker` names one, `open_broker` opens it.

A backend registers an opener (`settings -> Broker`); the built-in ones are imported
only when opened, so the API does not load the Google client to run on the local file.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from app.broker.base import Broker
    from app.settings import Settings

Opener = Callable[["Settings"], "Broker"]

_openers: dict[str, Opener] = {}
# name -> "module:class", imported on first use
_BUILT_IN = {
    "local": "app.broker.local.broker:LocalBroker",
    "pubsub": "app.broker.pubsub.broker:PubSubBroker",
}


class UnknownBroker(ValueError):
    """`Settings.broker` names no registered broker."""


def register(name: str, opener: Opener) -> None:
    """Make `name` a valid `BROKER`, opened by `opener(settings)`."""
    if not name or name != name.strip():
        raise ValueError(f"broker name {name!r} must be a non-empty word")
    _openers[name] = opener


def names() -> list[str]:
    return sorted(set(_BUILT_IN) | set(_openers))


def check_name(name: str) -> str:
    """`name` if a broker is registered under it; else `UnknownBroker` listing the known ones."""
    if name not in _openers and name not in _BUILT_IN:
        raise UnknownBroker(f"unknown broker {name!r}; registered: {', '.join(names())}")
    return name


def _opener(name: str) -> Opener:
    check_name(name)
    if name not in _openers:
        module, attribute = _BUILT_IN[name].split(":")
        _openers[name] = getattr(importlib.import_module(module), attribute)
    return _openers[name]


def open_broker(settings: Settings) -> Broker:
    """The broker `settings.broker` names, opened with `settings`."""
    broker = _opener(settings.broker)(settings)
    broker.name = settings.broker
    return broker
