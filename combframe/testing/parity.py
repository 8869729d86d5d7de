"""The full-graph reference and the gradient-parity check built on it.

The reference is what a user would write by hand: keep all N pose graphs, combine with
plain torch ops (the combination's own :meth:`~combframe.Combination.value`), and
call ``backward``. Every gradient path of combframe is checked against it; the
``combframe check`` command runs the same check for any installed combination.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from combframe.core.batch import default_collate
from combframe.core.combination import Combination, StreamingCombination
from combframe.core.strategies import STRATEGIES, Strategy
from combframe.errors import StrategyError, StrategyWarning

__all__ = [
    "LOSSES",
    "ParityResult",
    "full_graph_gradients",
    "gradient_parity",
    "make_loss",
    "mtenn_gradients",
    "multipose_gradients",
    "random_model",
]

LossKind = Literal["combined", "per_pose", "both"]
#: The loss mixes every gradient path is checked with.
LOSSES: tuple[LossKind, ...] = ("combined", "per_pose", "both")
LossFn = Callable[[Tensor, Tensor], Tensor]


def make_loss(kind: LossKind, target: float = 0.5) -> LossFn:
    """Make a loss on the combined prediction(s), on the per-pose predictions, or on both.

    The per-pose term uses pose-dependent weights so that every pose weight matters; the
    combined term sums over compounds (``combined`` is 0-d or ``(C,)``) with
    compound-dependent targets. Vector outputs (``(C, d)`` combined, ``(M, d)`` per
    pose) get a target per element.
    """

    def loss(combined: Tensor, per_pose: Tensor) -> Tensor:
        n = per_pose.shape[0]
        ramp = torch.linspace(0.5, 1.5, n, dtype=per_pose.dtype, device=per_pose.device)
        ramp = ramp.reshape(n, *(1,) * (per_pose.dim() - 1))  # (N, d): every column
        goal = target + 0.25 * torch.arange(
            combined.numel(), dtype=combined.dtype, device=combined.device
        ).reshape(combined.shape)
        comb_term = ((combined - goal) ** 2).sum()
        pose_term = (ramp * (per_pose - target) ** 2).sum()
        if kind == "combined":
            return comb_term
        if kind == "per_pose":
            return pose_term
        return comb_term + 0.3 * pose_term

    return loss


def _backward(
    modules: Sequence[torch.nn.Module], loss: LossFn, combined: Tensor, per_pose: Tensor
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Back-propagate ``loss``; return the values and the gradients (zeros if unused).

    The gradients are those of the trainable parameters of ``modules`` (the model, then
    the combination's own), in order.
    """
    loss(combined, per_pose).backward()
    return combined.detach(), per_pose.detach(), [g for m in modules for g in _grads_of(m)]


def _grads_of(module: torch.nn.Module) -> list[Tensor]:
    return [
        torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        for p in module.parameters()
        if p.requires_grad
    ]


def _clear(*modules: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
    """Set every ``.grad`` of ``modules`` to None; return them."""
    for m in modules:
        m.zero_grad(set_to_none=True)
    return modules


def full_graph_gradients(
    model: torch.nn.Module,
    combination: Combination,
    poses: Sequence[Any],
    loss: LossFn,
    *,
    sizes: Sequence[int] | None = None,
    chunk_size: int | None = None,
    collate: Callable[[list[Any]], Any] | None = None,
    prior: Tensor | None = None,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Return combined value(s), per-pose predictions and gradients with all graphs kept.

    The gradients are those of ``model``'s trainable parameters, then of the
    combination's own (a learnable temperature), if it has any. Their ``.grad`` fields
    are cleared first and hold the result afterwards.
    ``poses`` is one compound, or with ``sizes`` the flat poses of several compounds
    (then the combined values have shape ``(C,)``). With ``chunk_size`` the model runs on
    collated chunks, as :class:`~combframe.MultiPoseModel` does, still keeping every
    graph (the reference for models whose poses interact within a batch). A model may
    return ``d`` values per pose (``(M, d)`` per-pose predictions). ``prior``: the
    ``(M,)`` log prior of every pose (``-inf`` masks one), for a combination that takes it.
    """
    modules = _clear(model, combination)
    if chunk_size is None:
        per_pose = torch.stack([model(p).reshape(-1) for p in poses])
    else:
        join = collate or default_collate
        per_pose = torch.cat(
            [
                model(join(list(poses[s : s + chunk_size]))).reshape(
                    len(poses[s:][:chunk_size]), -1
                )
                for s in range(0, len(poses), chunk_size)
            ]
        )
    if per_pose.shape[1] == 1:
        per_pose = per_pose.reshape(-1)  # one value per pose
    parts = list(sizes or [len(poses)])
    value: Callable[..., Tensor] = combination.value
    given = [{}] * len(parts) if prior is None else [{"prior": q} for q in prior.split(parts)]
    combined = torch.stack(
        [value(y, **kw) for y, kw in zip(per_pose.split(parts), given, strict=True)]
    )
    if sizes is None:
        combined = combined[0]
    return _backward(modules, loss, combined, per_pose)


def multipose_gradients(
    model: torch.nn.Module,
    combination: Combination,
    poses: Sequence[Any],
    loss: LossFn,
    strategy: str | Strategy = "store",
    *,
    sizes: Sequence[int] | None = None,
    chunk_size: int = 1,
    collate: Callable[[list[Any]], Any] | None = None,
    prior: Tensor | None = None,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Return what :func:`full_graph_gradients` does, through ``MultiPoseModel``."""
    from combframe.core.model import MultiPoseModel

    modules = _clear(model, combination)
    wrapped = MultiPoseModel(
        model, combination, strategy=strategy, chunk_size=chunk_size, collate=collate
    )
    if sizes is None:
        combined, per_pose = wrapped(list(poses), prior=prior)
    else:
        cut = torch.tensor(list(sizes)).cumsum(0).tolist()
        compounds = [list(poses[a:b]) for a, b in zip([0, *cut[:-1]], cut, strict=True)]
        combined, per_pose, _ = wrapped(compounds=compounds, prior=prior)
    return _backward(modules, loss, combined, per_pose)


def mtenn_gradients(
    model: torch.nn.Module,
    combination: Combination,
    poses: Sequence[Any],
    loss: LossFn,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Return what :func:`full_graph_gradients` does, through the mtenn-style call.

    Per-pose gradients are collected by hand into mtenn's ``grad_dict`` and combined by
    ``combination(pred_list, grad_dict, param_names, *model_params)``, whose backward
    uses the combination's :meth:`~combframe.Combination.pose_weights`.
    """
    modules = _clear(model, combination)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    params = [p for _, p in named]
    preds: list[Tensor] = []
    grad_dict: dict[str, list[Tensor]] = {n: [] for n in names}
    for pose in poses:
        pred = model(pose).reshape(())
        grads = torch.autograd.grad(pred, params, allow_unused=True, materialize_grads=True)
        for n, g in zip(names, grads, strict=True):
            grad_dict[n].append(g)
        preds.append(pred.detach())
    combined, per_pose = combination(preds, grad_dict, names, *params)
    return _backward(modules, loss, combined, per_pose)


@dataclass
class ParityResult:
    """Outcome of :func:`gradient_parity`.

    Attributes
    ----------
    passed
        Whether every case agreed within ``rtol``.
    worst
        The largest relative error seen over all cases and parameters.
    rtol
        The tolerance used.
    cases
        One line per case: strategy, loss, N and its worst relative error.
    skipped
        Cases not run, with why (a strategy that does not support a loss).
    errors
        Cases that raised instead of returning gradients (only with
        ``on_error="record"``), as ``"strategy/loss/N=n: Type: message"``.
    """

    passed: bool
    worst: float
    rtol: float
    cases: list[tuple[str, str, int, float]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def skip(self, note: str) -> None:
        """Record a case that was not compared (once)."""
        if note not in self.skipped:
            self.skipped.append(note)

    def fail(self, case: str, exc: Exception, on_error: str) -> None:
        """Record ``exc`` as a failed case, or re-raise it when ``on_error == "raise"``."""
        if on_error == "raise":
            raise exc
        self.errors.append(f"{case}: {type(exc).__name__}: {exc}")
        self.passed = False

    def worst_case(self) -> tuple[str, str, int, float] | None:
        """Return the case with the largest relative error, or None when no case ran."""
        return max(self.cases, key=lambda c: c[3], default=None)


def _relative_error(got: Sequence[Tensor], want: Sequence[Tensor]) -> float:
    scale = max((w.abs().max().item() for w in want if w.numel()), default=0.0)
    diff = max(((g - w).abs().max().item() for g, w in zip(got, want, strict=True)), default=0.0)
    if not math.isfinite(diff):
        return math.inf
    return diff / scale if scale > 0 else diff


def random_model(
    seed: int, features: int, hidden: int = 16, dropout: float = 0.0, outputs: int = 1
) -> torch.nn.Module:
    """Build a small float64 single-pose MLP with N(0, 1) weights drawn from ``seed``.

    ``model(pose)`` maps a ``(1, features)`` pose to one element, or with ``outputs > 1``
    to ``(1, outputs)`` (a vector per pose). With ``dropout > 0`` a dropout layer follows
    the hidden activation (for RNG-replay checks).
    """
    gen = torch.Generator().manual_seed(seed)
    layers: list[torch.nn.Module] = [torch.nn.Linear(features, hidden), torch.nn.Tanh()]
    if dropout > 0:
        layers.append(torch.nn.Dropout(dropout))
    layers += [torch.nn.Linear(hidden, outputs)]
    layers += [torch.nn.Flatten(0)] if outputs == 1 else []
    model = torch.nn.Sequential(*layers).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def gradient_parity(
    combination: Combination,
    *,
    strategies: Sequence[str] = (*STRATEGIES, "mtenn"),
    losses: Sequence[LossKind] = LOSSES,
    n_poses: Sequence[int] = (1, 2, 7),
    seeds: Sequence[int] = (0, 1),
    rtol: float = 1e-10,
    model_factory: Callable[[int, int], torch.nn.Module] | None = None,
    features: int = 5,
    on_error: Literal["raise", "record"] = "raise",
    chunk_sizes: Sequence[int] = (1, 3),
    compounds: Sequence[int] = (1, 3),
    outputs: int = 1,
    prior: bool = False,
) -> ParityResult:
    """Check a combination's gradients against the full-graph reference in float64.

    Random models and poses are drawn for every seed and N; for each strategy and loss
    the gradients of every parameter from :class:`~combframe.MultiPoseModel` (the
    model's, and the combination's own trainable parameters, such as a learnable
    temperature) are compared with those of the full-graph reference, one pose per
    pass and in chunks of each of ``chunk_sizes`` (stacked poses), for one compound and
    for batches of each of ``compounds`` compounds (the ``c``-th has ``N + c`` poses, so
    the combination's :meth:`~combframe.Combination.segment_value` is checked on unequal
    segments).
    ``"mtenn"`` checks the mtenn-style call
    ``combination(pred_list, grad_dict, param_names, *params)`` (one compound, one pose
    per pass), whose backward uses the closed-form
    :meth:`~combframe.Combination.pose_weights`. Strategies that do not
    support a loss (``stream`` with a per-pose loss) are skipped after checking that
    they refuse it. ``outputs > 1``: vector outputs (no mtenn call); ``prior``: random
    log priors, a pose masked.

    With ``on_error="record"`` an exception raised by the combination (a wrong shape of
    pose weights, say) fails its case and is kept in ``errors`` instead of propagating,
    so that every case is still tried; ``combframe check`` runs this way.

    Returns
    -------
    ParityResult
        ``passed`` is True when every relative error is at most ``rtol``.
    """
    factory = model_factory or (lambda s, f: random_model(s, f, outputs=outputs))
    result = ParityResult(passed=True, worst=0.0, rtol=rtol)
    pairs = ((c, b) for c in dict.fromkeys((1, *compounds)) for b in chunk_sizes)
    layouts = [(1, 1)] + [(c, b) for c, b in pairs if (c, b) != (1, 1)]
    for seed in seeds:
        for n in n_poses:
            for count, chunk in layouts:
                sizes = [n + c for c in range(count)]
                gen = torch.Generator().manual_seed(1000 * seed + 100 * count + n)
                poses = [
                    torch.randn((1, features), generator=gen, dtype=torch.float64)
                    for _ in range(sum(sizes))
                ]
                logp = _random_prior(sizes, gen) if prior else None
                one = (sizes if count > 1 else None, chunk, strategies, losses, on_error, logp)
                _parity_cases(result, combination, factory(seed, features), poses, *one)
    return result


def _random_prior(sizes: list[int], gen: torch.Generator) -> Tensor:
    """Random log priors for the poses; the last pose masked (-inf) if it is not alone."""
    logp = torch.randn(sum(sizes), generator=gen, dtype=torch.float64)
    if sizes[-1] > 1:
        logp[-1] = -torch.inf
    return logp


def _parity_cases(
    result: ParityResult,
    combination: Combination,
    base: torch.nn.Module,
    poses: list[Tensor],
    sizes: list[int] | None,
    chunk: int,
    strategies: Sequence[str],
    losses: Sequence[LossKind],
    on_error: Literal["raise", "record"],
    prior: Tensor | None = None,
) -> None:
    """Compare every strategy and loss on one set of compounds with the reference."""
    n = len(poses) if sizes is None else sizes[0]
    where = (
        f"N={n}"
        + ("" if sizes is None else f", C={len(sizes)}")
        + ("" if chunk == 1 else f", chunk={chunk}")
    )
    own = sum(1 for p in combination.parameters() if p.requires_grad)
    for kind in losses:
        loss = make_loss(kind)
        try:
            want = full_graph_gradients(base, combination, poses, loss, sizes=sizes, prior=prior)
        except Exception as exc:
            result.fail(f"reference/{kind}/{where}", exc, on_error)
            continue
        for strategy in strategies:
            if strategy == "stream" and not isinstance(combination, StreamingCombination):
                result.skip(f"stream: {combination.name!r} does not implement streaming")
                continue
            if strategy == "mtenn" and (
                sizes is not None or chunk != 1 or want[1].dim() > 1 or prior is not None
            ):
                continue  # the mtenn call takes one compound, one value per pose, no prior
            try:
                got = _strategy_gradients(
                    base, combination, poses, loss, strategy, sizes, chunk, prior
                )
            except Exception as exc:
                if isinstance(exc, StrategyError) and kind != "combined":
                    result.skip(f"{strategy}/{kind}: {exc}")
                else:
                    result.fail(f"{strategy}/{kind}/{where}", exc, on_error)
                continue
            cut = len(got[2]) - own  # the combination's own gradients, on their own scale
            err = max(
                _relative_error(got[2][:cut], want[2][:cut]),
                _relative_error(got[2][cut:], want[2][cut:]),
                _relative_error([got[0]], [want[0]]),
                _relative_error([got[1]], [want[1]]),
            )
            result.cases.append((strategy, kind, n, err))
            result.worst = max(result.worst, err)
            if not err <= result.rtol:
                result.passed = False


def _strategy_gradients(
    base: torch.nn.Module,
    combination: Combination,
    poses: list[Tensor],
    loss: LossFn,
    strategy: str,
    sizes: list[int] | None,
    chunk: int,
    prior: Tensor | None = None,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Gradients of one strategy (or the mtenn call) on a copy of ``base``."""
    model = copy.deepcopy(base)
    if strategy == "mtenn":
        return mtenn_gradients(model, combination, poses, loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StrategyWarning)
        return multipose_gradients(
            model, combination, poses, loss, strategy, sizes=sizes, chunk_size=chunk, prior=prior
        )
