"""Hook specifications: what a combframe plugin may implement."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from combframe.core.combination import Combination

__all__ = ["hookimpl", "hookspec"]

#: Marker for hook specifications of project ``combframe``.
hookspec = pluggy.HookspecMarker("combframe")
#: Marker a plugin puts on its hook implementations.
hookimpl = pluggy.HookimplMarker("combframe")


@hookspec
def combframe_add_combinations() -> Sequence[type[Combination]]:
    """Return the combination classes this plugin provides.

    Called with no arguments, once each time the registry is built (first use, or
    :func:`combframe.registry.reload_registry`). Each class derives from
    :class:`combframe.Combination`, sets a non-empty ``name``, a ``Params`` model
    derived from :class:`combframe.CombinationParams` (without a field called
    ``name``) and implements ``value``; it may set ``aliases`` and
    ``deprecated_aliases`` (tuples of names; a deprecated one warns when used).

    If this hook raises or returns something invalid, none of the plugin's classes is
    registered, a :class:`combframe.errors.PluginWarning` names the plugin and the error, and
    the failure appears in :func:`combframe.registry.plugin_errors` (with
    ``COMBFRAME_STRICT_PLUGINS=1``: :class:`combframe.errors.InvalidPluginError`).

    Returns
    -------
    Sequence[type[Combination]]
        The combination classes; may be empty. Returning a class that another plugin
        already registered is a no-op; a different class under a name or alias that is
        taken raises :class:`combframe.errors.InvalidPluginError` naming both plugins.
    """
    raise NotImplementedError
