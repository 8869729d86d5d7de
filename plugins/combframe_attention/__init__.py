r"""Gated-attention pooling of per-pose embeddings (Ilse et al. 2018), vector outputs.

Each pose gives an embedding :math:`e_i \in \mathbb{R}^d` (the model returns ``(N, d)``);
with scores :math:`a_i = w^\top(\tanh(V e_i) \odot \sigma(U e_i))` (plain attention,
``gated=False``: :math:`w^\top \tanh(V e_i)`), a log prior :math:`p` and
:math:`\alpha = \operatorname{softmax}(a + p)`, the pooled embedding is
:math:`G = \sum_i \alpha_i e_i \in \mathbb{R}^d`; the head :math:`f` of
:math:`f(G)` is the model's ``comb_readout``. :math:`V, U, w` are trained with the model.
Pose weights: :math:`\alpha` (``pool_weights``). Stream (one group, ``2d+1`` sums):
directions :math:`\epsilon_k`, :math:`(e_{ik} - c_k)\nabla_e a_i`, :math:`\nabla_e a_i`;
coefficients :math:`(I, I, -(G - c))`, derived in docs/math.md.
"""

import torch
from pydantic import Field
from torch import Tensor

import combframe
from combframe.segment import segment_softmax, segment_sum, with_prior


class AttentionParams(combframe.CombinationParams):
    """Parameters of :class:`GatedAttention`."""

    dim: int = Field(gt=0, description="Embedding size d: values the model returns per pose.")
    hidden: int = Field(64, gt=0, description="Hidden size of the attention network.")
    gated: bool = Field(True, description="Gate the scores with sigmoid(U e) (Ilse et al.).")


class GatedAttention(combframe.Combination[AttentionParams]):
    """Gated-attention pooling of per-pose embeddings, with its own trainable weights."""

    name = "gated_attention"
    aliases = ("attention",)
    pools = True

    def build(self) -> None:
        d, h = self.params.dim, self.params.hidden
        self.V, self.w = torch.nn.Linear(d, h), torch.nn.Linear(h, 1)
        self.U = torch.nn.Linear(d, h) if self.params.gated else None

    def scores(self, preds: Tensor) -> Tensor:
        """Return :math:`a_i` of ``(N, d)`` embeddings, shape ``(N,)``."""
        e = preds.reshape(preds.shape[0], -1)
        if e.shape[1] != self.params.dim:
            raise combframe.CombinationError(
                f"{self.name} pools embeddings of dim={self.params.dim}, but the predictions "
                f"have shape {tuple(preds.shape)}; set dim to the values per pose"
            )
        hidden = torch.tanh(self.V(e))
        gate = torch.sigmoid(self.U(e)) if self.U is not None else 1.0
        scores: Tensor = self.w(hidden * gate).squeeze(-1)
        return scores

    def value(self, preds: Tensor, prior: Tensor | None = None) -> Tensor:
        alpha = torch.softmax(with_prior(self.scores(preds), prior), 0)
        return (alpha.reshape(-1, *(1,) * (preds.dim() - 1)) * preds).sum(0)

    def pool_weights(
        self, preds: Tensor, index: Tensor, num_segments: int, prior: Tensor | None = None
    ) -> Tensor:
        return segment_softmax(with_prior(self.scores(preds), prior), index, num_segments)

    def segment_value(
        self, preds: Tensor, index: Tensor, num_segments: int, prior: Tensor | None = None
    ) -> Tensor:
        alpha = self.pool_weights(preds, index, num_segments, prior)
        return segment_sum(
            alpha.reshape(-1, *(1,) * (preds.dim() - 1)) * preds, index, num_segments
        )

    def stream_terms(self, preds: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            e = preds.detach().requires_grad_(True)
            a = self.scores(e)
            (grad,) = torch.autograd.grad(a.sum(), e)  # each pose's own: nabla_e a_i
        b, d = e.shape
        one_hot = torch.eye(d, dtype=e.dtype, device=e.device).expand(b, d, d)
        centred = (e.detach() - center.to(e.dtype))[:, :, None] * grad[:, None, :]
        return a.detach(), torch.cat([one_hot, centred, grad[:, None, :]], 1)

    def stream_shift(self, old: Tensor, new: Tensor) -> Tensor:
        zero = torch.zeros_like(old)
        column = torch.cat([zero, old - new, zero[:1]])  # S2_k += (c_k - c'_k) S3
        last = torch.cat([zero, zero, torch.ones_like(old[:1])])
        eye = torch.eye(column.shape[0], dtype=old.dtype, device=old.device)
        return eye + torch.outer(column, last)

    def stream_coefficients(self, combined: Tensor, center: Tensor) -> Tensor:
        eye = torch.eye(combined.shape[0], dtype=combined.dtype, device=combined.device)
        return torch.cat([eye, eye, -(combined - center)[None]])
