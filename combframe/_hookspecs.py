"""Hook specifications: what a combframe plugin may implement."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from combframe._combination import BaseCombination

__all__ = ["hookimpl", "hookspec"]

#: Marker for hook specifications of project ``combframe``.
hookspec = pluggy.HookspecMarker("combframe")
#: Marker a plugin puts on its hook implementations.
hookimpl = pluggy.HookimplMarker("combframe")


@hookspec
def combframe_add_combinations() -> Sequence[type[BaseCombination]]:
    """Return the combination classes this plugin provides.

    Called once when the registry is built. Each class derives from
    :class:`combframe.BaseCombination` and sets ``name`` (and, optionally, ``aliases``
    and ``deprecated_aliases``).

    Returns
    -------
    Sequence[type[BaseCombination]]
        The combination classes; may be empty.
    """
    raise NotImplementedError
