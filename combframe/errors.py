"""Exceptions and warnings raised by combframe.

Every exception derives from :class:`CombframeError` and keeps a builtin base
(``except ValueError`` catches a :class:`CombinationError`); every warning derives from
:class:`CombframeWarning`.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError, ValidationError

__all__ = [
    "AmbiguousCombinationError",
    "CombframeError",
    "CombframeWarning",
    "CombinationError",
    "InvalidParametersError",
    "InvalidPluginError",
    "PluginWarning",
    "StrategyError",
    "StrategyWarning",
    "UnknownCombinationError",
]


class CombframeError(Exception):
    """Root of every exception combframe raises (``except combframe.CombframeError``)."""


class CombframeWarning(UserWarning):
    """Root of every warning combframe emits."""


class CombinationError(CombframeError, ValueError):
    """Bad input to a combination: shapes, lengths, names or values that do not fit."""


class InvalidParametersError(CombinationError, ValidationError):
    """A combination's parameters were refused (``dim=-1``, ``kT=0``, an unknown keyword).

    Both a :class:`CombinationError` (so a :class:`CombframeError` and a ``ValueError``)
    and pydantic's ``ValidationError``, with the same ``errors()`` and message naming the
    field, its bound and the value: ``except CombframeError`` and ``except
    pydantic.ValidationError`` both catch it. Raised by a combination's constructor, an
    assignment to a parameter (which keeps the old value) and
    :func:`combframe.create_combination`; building a
    :class:`~combframe.CombinationConfig` raises pydantic's own ``ValidationError``.
    """

    @classmethod
    def of(cls, exc: ValidationError) -> InvalidParametersError:
        """Return ``exc`` (pydantic's) as this error, with the same errors and message."""
        try:
            return cls.from_exception_data(exc.title, [_again(e) for e in exc.errors()])
        except (TypeError, KeyError, ValueError):  # a custom error type: kept by message
            return cls.from_exception_data(exc.title, [_again(e, True) for e in exc.errors()])


def _again(error: ErrorDetails, custom: bool = False) -> InitErrorDetails:
    """Return one of pydantic's reported errors as the details that raise it again."""
    if custom:
        message = error["msg"].replace("{", "{{").replace("}", "}}")
        kind = PydanticCustomError(error["type"], message)
        return InitErrorDetails(type=kind, loc=error["loc"], input=error["input"])
    details = InitErrorDetails(type=error["type"], loc=error["loc"], input=error["input"])
    if "ctx" in error:
        details["ctx"] = error["ctx"]
    return details


class StrategyError(CombframeError, RuntimeError):
    """A gradient strategy was asked for something it cannot compute exactly."""


class StrategyWarning(CombframeWarning):
    """A gradient strategy runs slower than asked (for example one pose per pass)."""


class UnknownCombinationError(CombframeError, LookupError):
    """No installed combination answers to the requested name.

    Parameters
    ----------
    name
        The name that was asked for, as given.
    installed
        The names that are installed, sorted.
    suggestion
        The closest installed name, if any is close.
    failed
        Plugins that failed to load (named in the message, since the combination may
        have come from one of them).
    """

    def __init__(
        self,
        name: str,
        installed: list[str],
        suggestion: str | None,
        *,
        failed: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.installed = installed
        self.suggestion = suggestion
        self.failed = failed
        hint = f" Did you mean {suggestion!r}?" if suggestion else ""
        listing = ", ".join(repr(n) for n in installed) or "none"
        broken = (
            " Plugins that failed to load: " + ", ".join(repr(p) for p in failed) + "."
            if failed
            else ""
        )
        super().__init__(
            f"unknown combination {name!r}.{hint} Installed combinations: {listing}. "
            "If the combination comes from a plugin, check that its package is installed "
            "and not blocked (`combframe list` shows load errors)." + broken
        )

    def __str__(self) -> str:
        return str(self.args[0])


class AmbiguousCombinationError(UnknownCombinationError):
    """Two installed plugins claim the requested name, so it names neither.

    The other names of both plugins keep working; this one is refused when it is used,
    until one of the two plugins is blocked or uninstalled.

    Parameters
    ----------
    name
        The name that was asked for, as given.
    claims
        Who claims it: one description per plugin, with its class.
    block
        The ``COMBFRAME_BLOCK_PLUGINS`` values that block each claimant.
    installed
        The names that are installed and usable, sorted.
    """

    def __init__(
        self, name: str, claims: list[str], block: list[str], installed: list[str]
    ) -> None:
        self.claims = claims
        self.block = block
        super().__init__(name, installed, None)
        self.args = (
            f"combination name {name!r} is ambiguous: "
            + " and ".join(claims)
            + ". Uninstall one of them, or block one by distribution, e.g. "
            + " or ".join(f"COMBFRAME_BLOCK_PLUGINS={b}" for b in block)
            + ".",
        )


class InvalidPluginError(CombframeError):
    """A plugin registered something combframe cannot accept.

    Named apart from pluggy's ``PluginValidationError``, the name it had in 0.1 (still
    importable, with a :class:`DeprecationWarning`).

    Parameters
    ----------
    plugin
        The offending plugin object (module, instance or combination class), kept for
        inspection; the entry-point name when the plugin could not even be imported.
    message
        What was wrong and what to do about it.
    """

    def __init__(self, plugin: object, message: str) -> None:
        self.plugin = plugin
        super().__init__(message)


class PluginWarning(CombframeWarning):
    """A plugin failed to load or register and was skipped.

    Set ``COMBFRAME_STRICT_PLUGINS=1`` to turn these warnings into errors.
    """


def user_stacklevel() -> int:
    """Return the ``stacklevel`` of the first caller outside combframe and torch.

    A warning then points at the user's line, not at combframe's internals.
    """
    frame = sys._getframe(1)  # the function that will call warnings.warn
    level = 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(
        ("combframe", "torch", "importlib")
    ):
        frame = frame.f_back
        level += 1
    return level


#: Names of earlier releases: old name -> the current one.
_RENAMED = {"PluginValidationError": "InvalidPluginError"}


def __getattr__(name: str) -> Any:
    if name in _RENAMED:
        new = _RENAMED[name]
        warnings.warn(
            f"combframe.errors.{name} is deprecated; use combframe.errors.{new} (the same class)",
            DeprecationWarning,
            stacklevel=2,
        )
        return globals()[new]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
