r"""A combination's stream terms for one call's outputs: groups of directions in output space.

The stream strategy keeps, per compound, ``G`` online softmaxes (*groups*) of ``k``
sums each. A sum is a vector-Jacobian product of the poses with a per-pose *direction*
in the output space :math:`\mathbb{R}^d`, weighted :math:`e^{a_{ig} - m_g}`:

.. math::

    A_{gj} = \sum_i e^{a_{ig} - m_g}\, \phi_{igj}^\top \frac{\partial y_i}{\partial\theta},
    \qquad
    \frac{\partial L}{\partial\theta}
    = \sum_{g,j} \frac{(\Lambda_{g} \, \partial L/\partial G)_j}{Z_g}\, A_{gj},

with coefficients :math:`\Lambda_g` (``(k, d_out)``) known once :math:`G` is. One value
per pose is ``G = d = d_out = 1``, the scalar protocol of
:class:`~combframe.core.streaming.StreamingCombination`. For ``d`` values per pose a
column-wise combination (``pools = False``) runs that protocol on every column: ``G = d``
groups whose directions are one-hot in their column. A pooling one (``pools = True``)
writes the vector protocol itself: one group, its own directions and ``(k, d_out)``
coefficients (attention: ``k = 2d + 1``).
"""

from __future__ import annotations

from typing import final

import torch
from torch import Tensor

from combframe.core.streaming import StreamingCombination


@final
class StreamTerms:
    """:class:`StreamingCombination`'s terms as groups of directions, for ``d`` values per pose.

    Parameters
    ----------
    combination
        The streaming combination.
    width
        ``d``, the values per pose (1 for one value).
    """

    def __init__(self, combination: StreamingCombination, width: int) -> None:
        self.combination = combination
        self.width = width
        self.pools = bool(getattr(combination, "pools", False))
        #: ``G``: one online softmax per column for a column-wise combination.
        self.groups = 1 if self.pools else width
        self.shifts = getattr(combination, "stream_shift", None) is not None

    def _eye(self, like: Tensor) -> Tensor:
        return torch.eye(self.width, dtype=like.dtype, device=like.device)

    def terms(self, preds: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
        """Return log weights ``(b, G)`` and directions ``(b, G, k, d)`` of ``b`` poses.

        ``preds`` is ``(b,)`` or ``(b, d)``, ``center`` the ``(b, d)`` centre of each
        pose's compound.
        """
        b, d = preds.shape[0], self.width
        if self.pools:
            log_w, phi = self.combination.stream_terms(preds.reshape(b, d), center)
            return log_w.reshape(b, 1), phi.reshape(b, 1, -1, d)
        log_w, phi = self.combination.stream_terms(preds.reshape(-1), center.reshape(-1))
        phi = phi.reshape(b, d, -1)
        return log_w.reshape(b, d), phi[..., None] * self._eye(phi)[None, :, None, :]

    def coefficients(self, combined: Tensor, center: Tensor) -> Tensor:
        r"""Return :math:`\Lambda` of every compound, ``(C, G, k, d_out)``, from ``(C, ...)``."""
        c = combined.shape[0]
        if self.pools:
            coeffs = _each(self.combination.stream_coefficients, combined.reshape(c, -1), center)
            return coeffs.reshape(c, 1, coeffs.shape[1], -1)
        flat = _each(self.combination.stream_coefficients, combined.reshape(-1), center.reshape(-1))
        lam = flat.reshape(c, self.width, -1)
        return lam[..., None] * self._eye(lam)[None, :, None, :]

    def shift(self, old: Tensor, new: Tensor) -> Tensor:
        """Return the ``(n, G, k, k)`` matrices moving ``n`` compounds' centres ``(n, d)``."""
        shift = self.combination.stream_shift  # type: ignore[attr-defined]  # self.shifts
        n = old.shape[0]
        if self.pools:
            pooled: Tensor = torch.vmap(shift)(old, new)
            return pooled.unsqueeze(1)
        moves: Tensor = torch.vmap(shift)(old.reshape(-1), new.reshape(-1))
        return moves.reshape(n, self.width, *moves.shape[1:])

    def rows(self, device: torch.device) -> int:
        """Return ``G k``, the sums kept per compound (for memory estimates)."""
        own = getattr(self.combination, "parameters", lambda: iter(()))
        first = next(iter(own()), None)  # in the dtype of its own layers, if it has some
        dtype = torch.float64 if first is None else first.dtype
        zero = torch.zeros(1, self.width, dtype=dtype, device=device)
        _, phi = self.terms(zero if self.width > 1 or self.pools else zero[:, 0], zero)
        return int(phi.shape[1] * phi.shape[2])


def _each(fn: object, combined: Tensor, center: Tensor) -> Tensor:
    """``fn(G_c, c_c)`` of every compound, stacked (vmapped where the plugin allows)."""
    assert callable(fn)
    try:
        out: Tensor = torch.vmap(fn)(combined, center)
    except Exception:  # a plugin whose coefficients vmap cannot map: one call per compound
        out = torch.stack([fn(g, c) for g, c in zip(combined, center, strict=True)])
    return out
