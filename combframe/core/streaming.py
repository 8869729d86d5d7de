r"""What a combination writes to run under the ``"stream"`` strategy.

:class:`StreamingCombination` is a structural protocol (no registration): a combination
that writes its methods is streamable. Re-exported by :mod:`combframe.core.combination`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

__all__ = ["StreamingCombination"]


@runtime_checkable
class StreamingCombination(Protocol):
    r"""Optional extension: a combination that the ``"stream"`` strategy can run.

    The stream strategy never stores per-pose gradients. It keeps, for ``k`` features,
    running sums :math:`A_j = \sum_i e^{a_i - m} \phi_{ij} \, \partial y_i/\partial\theta`
    and :math:`Z = \sum_i e^{a_i - m}` with a running maximum :math:`m` of the log weights
    :math:`a_i` (the online softmax of FlashAttention), so that at the end

    .. math::

        \frac{\partial h}{\partial y_i} = \operatorname{softmax}(a)_i \sum_j \lambda_j \phi_{ij},
        \qquad
        \sum_i \frac{\partial h}{\partial y_i} \frac{\partial y_i}{\partial\theta}
        = \frac{1}{Z} \sum_j \lambda_j A_j .

    A combination opts in by writing the two methods below (a structural check: no
    registration); :math:`a_i` and :math:`\phi_i` may depend on :math:`y_i` and on a
    centre :math:`c`, the coefficients :math:`\lambda` on :math:`G` and :math:`c`. The
    centre starts at the compound's first prediction. A combination whose features
    depend on it should also write ``stream_shift(old, new)``, returning the ``(k, k)``
    matrix :math:`M` with :math:`\phi(y; c_\text{new}) = M\,\phi(y; c_\text{old})` for
    every :math:`y`: the strategy then keeps the centre on the best pose seen so far
    (re-expressing the sums as :math:`A \leftarrow M A`, exact), so that sums of large,
    nearly cancelling terms never arise whatever the order of the poses.

    For ``d`` values per pose a combination that combines each column on its own needs
    nothing more: the strategy runs these methods on every column. A pooling
    combination (``pools = True``) writes them for vectors: ``stream_terms`` takes
    ``(b, d)`` predictions and centres and returns log weights ``(b,)`` and *directions*
    ``(b, k, d)`` (the sums are vector-Jacobian products along them),
    ``stream_coefficients`` takes one compound's ``(d_out,)`` value and ``(d,)`` centre
    and returns a ``(k, d_out)`` matrix, contracted with :math:`\partial L/\partial G`;
    ``stream_shift`` takes the old and new ``(d,)`` centres
    (:mod:`combframe.core.strategies.terms`).
    """

    def stream_terms(self, preds: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
        r"""Return log weights :math:`a` and features :math:`\phi`.

        ``a`` has the shape of ``preds``; ``phi`` has shape ``preds.shape + (k,)``.
        """
        ...

    def stream_coefficients(self, combined: Tensor, center: Tensor) -> Tensor:
        r"""Return the ``k`` coefficients :math:`\lambda` given :math:`G` and the centre."""
        ...
