"""Exceptions raised by combframe."""

from __future__ import annotations

__all__ = [
    "CombinationError",
    "PluginValidationError",
    "StrategyError",
    "UnknownCombinationError",
]


class CombinationError(ValueError):
    """Bad input to a combination: shapes, lengths, names or values that do not fit."""


class StrategyError(RuntimeError):
    """A gradient strategy was asked for something it cannot compute exactly."""


class UnknownCombinationError(LookupError):
    """No installed combination answers to the requested name.

    Parameters
    ----------
    name
        The name that was asked for, as given.
    installed
        The names that are installed, sorted.
    suggestion
        The closest installed name, if any is close.
    """

    def __init__(self, name: str, installed: list[str], suggestion: str | None) -> None:
        self.name = name
        self.installed = installed
        self.suggestion = suggestion
        hint = f" Did you mean {suggestion!r}?" if suggestion else ""
        listing = ", ".join(repr(n) for n in installed) or "none"
        super().__init__(
            f"unknown combination {name!r}.{hint} Installed combinations: {listing}. "
            "If the combination comes from a plugin, check that its package is installed "
            "and not blocked (`combframe list` shows load errors)."
        )

    def __str__(self) -> str:
        return str(self.args[0])


class PluginValidationError(Exception):
    """A plugin registered something combframe cannot accept.

    Parameters
    ----------
    plugin
        The offending plugin object (module or instance), kept for inspection.
    message
        What was wrong and what to do about it.
    """

    def __init__(self, plugin: object, message: str) -> None:
        self.plugin = plugin
        super().__init__(message)
