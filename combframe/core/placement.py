"""Where a combination's own parameters live: the model's dtype and device."""

from __future__ import annotations

import torch
from torch import Tensor

from combframe.core.combination import Combination
from combframe.errors import CombinationError

__all__ = ["place_combination"]


def _floating(module: torch.nn.Module) -> list[Tensor]:
    return [p for p in module.parameters() if p.is_floating_point()]


def place_combination(combination: Combination, model: torch.nn.Module, *, given: bool) -> None:
    """Put a combination's parameters in the model's dtype and device, or refuse it.

    One built from a name or config (``given=False``) is moved to the dtype and device
    of the model's first floating parameter. A combination module the user made
    (``given=True``) is left as it is, but refused when its floating parameters are of
    another dtype than the model's: its layers would meet the model's predictions in
    the wrong dtype (a matmul of Double and Float) only at the first forward, after
    the poses had run.

    Raises
    ------
    CombinationError
        For a given module whose parameters' dtypes differ from the model's, naming
        both and the conversion that fixes it.
    """
    params = _floating(model)
    if not params:
        return
    if not given:
        combination.to(device=params[0].device, dtype=params[0].dtype)
        return
    ours = {str(p.dtype) for p in _floating(combination)}
    theirs = {str(p.dtype) for p in params}
    if not ours or ours == theirs:
        return
    have, want = ("/".join(sorted(d)) for d in (ours, theirs))
    raise CombinationError(
        f"the combination {combination.name!r} has parameters of dtype {have}, but the "
        f"model's are {want}: convert one to the other's dtype before building "
        f"MultiPoseModel, comb.to({want}) or model.to({have}) (model.double() for "
        "float64), or pass the combination by name so that it follows the model"
    )
