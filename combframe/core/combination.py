r"""The contract every combination fulfils: :class:`Combination` and its parameters.

A combination turns N per-pose predictions :math:`y_1 \dots y_N` into one value
:math:`G = h(y)`. A plugin subclasses ``Combination[MyParams]``, sets ``name`` and
writes :meth:`~Combination.value`; everything else (the per-pose gradient bookkeeping,
strategies, batching, the mtenn-style call) is shared. Optional methods refine it: a
batched :meth:`~Combination.segment_value`, closed-form
:meth:`~Combination.pose_weights`, and the stream terms of :class:`StreamingCombination`.
"""

from __future__ import annotations

import inspect
import typing
from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Generic, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor
from typing_extensions import TypeVar

from combframe.core.gradients import PoseGradients
from combframe.errors import CombinationError

__all__ = [
    "Combination",
    "CombinationParams",
    "StreamingCombination",
    "as_combination",
    "normalize_name",
    "set_mtenn_call",
    "set_resolver",
]


class CombinationParams(BaseModel):
    """Base of every combination's parameter model.

    Unknown fields are rejected and instances are immutable; subclasses declare their
    fields with :func:`pydantic.Field` bounds (``gt=0`` and the like), so a bad value is
    reported with the field name and the bound.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


#: The parameter model of a combination class (``Combination[MaxParams]``).
P = TypeVar("P", bound=CombinationParams, default=CombinationParams, covariant=True)


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
    """

    def stream_terms(self, preds: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
        r"""Return log weights :math:`a` and features :math:`\phi`.

        ``a`` has the shape of ``preds``; ``phi`` has shape ``preds.shape + (k,)``.
        """
        ...

    def stream_coefficients(self, combined: Tensor, center: Tensor) -> Tensor:
        r"""Return the ``k`` coefficients :math:`\lambda` given :math:`G` and the centre."""
        ...


class Combination(torch.nn.Module, Generic[P], metaclass=ABCMeta):
    r"""Base class of every combination: typed parameters, the math, the mtenn call.

    A subclass names its parameter model in the brackets, sets ``name`` and writes
    :meth:`value`::

        class SoftMin(Combination[SoftMinParams]):
            name = "softmin"

            def value(self, preds):
                return -self.params.t * torch.logsumexp(-preds / self.params.t, dim=0)

    Parameters are given as keyword or positional arguments in the order of the
    ``Params`` fields (the class's signature lists them), validated by pydantic, and
    readable as attributes (``comb.t``); assigning one re-validates it. Calling the module
    with mtenn's signature ``comb(pred_list, grad_dict, param_names, *model_params)``
    returns ``(combined, per_pose)`` through mtenn's shared autograd Function
    (:class:`combframe.mtenn.CombinationFunction`).

    Attributes
    ----------
    name
        The registered name (case-insensitive; ``-`` and ``_`` alike).
    aliases, deprecated_aliases
        Other accepted names; a deprecated one warns.
    mtenn_fields
        mtenn-style flat config fields and the parameter each sets, for
        :func:`combframe.mtenn.from_mtenn_config` (``{"max_comb_scale": "pred_scale"}``).
    Params
        The parameter model, taken from the brackets.
    params
        This instance's validated parameters.
    """

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    deprecated_aliases: ClassVar[tuple[str, ...]] = ()
    mtenn_fields: ClassVar[Mapping[str, str]] = {}
    Params: ClassVar[type[CombinationParams]] = CombinationParams
    params: P

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in cls.__dict__.get("__orig_bases__", ()):
            args = typing.get_args(base)
            if args and isinstance(args[0], type) and issubclass(args[0], CombinationParams):
                cls.Params = args[0]
        if "__init__" not in cls.__dict__:
            cls.__signature__ = inspect.Signature(  # type: ignore[attr-defined]  # read by inspect
                [
                    inspect.Parameter(
                        field,
                        inspect.Parameter.POSITIONAL_OR_KEYWORD,
                        default=inspect.Parameter.empty if info.is_required() else info.default,
                    )
                    for field, info in cls.Params.model_fields.items()
                ]
            )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Validate the parameters (positional in ``Params`` field order, or by keyword)."""
        super().__init__()
        fields = list(self.Params.model_fields)
        if len(args) > len(fields):
            raise TypeError(
                f"{type(self).__name__} takes at most {len(fields)} positional parameters "
                f"({', '.join(fields) or 'none'}); got {len(args)}"
            )
        for field, arg in zip(fields, args, strict=False):
            if field in kwargs:
                raise TypeError(f"{type(self).__name__} got parameter {field!r} twice")
            kwargs[field] = arg
        object.__setattr__(self, "params", self.Params(**kwargs))

    def __getattr__(self, item: str) -> Any:
        """Read a parameter as an attribute (``comb.pred_scale``)."""
        params = self.__dict__.get("params")
        if params is not None and item in type(params).model_fields:
            return getattr(params, item)
        return super().__getattr__(item)

    def __setattr__(self, key: str, value: Any) -> None:
        """Assign a parameter as an attribute; the new value is validated."""
        if key in type(self).Params.model_fields and "params" in self.__dict__:
            new = self.params.model_dump()
            new[key] = value
            object.__setattr__(self, "params", self.Params(**new))
            return
        super().__setattr__(key, value)

    def hyperparameters(self) -> tuple[Any, ...]:
        """Return the parameter values in ``Params`` field order."""
        return tuple(getattr(self.params, f) for f in type(self.params).model_fields)

    def to_config(self) -> dict[str, Any]:
        """Return ``{"name": ..., <params>}``, the dictionary form of this combination."""
        return {"name": self.name, **self.params.model_dump()}

    # ---- the settings in a state_dict ---------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        """Return the name and parameters that ``state_dict()`` carries (``_extra_state``).

        Plain dicts, strings and numbers (the JSON form of the parameters), so a
        checkpoint loads with ``torch.load(..., weights_only=True)``.
        """
        return {"name": self.name, "params": self.params.model_dump(mode="json")}

    def set_extra_state(self, state: Any) -> None:
        """Check a ``state_dict``'s combination against this one; raise if they differ.

        Loading a state_dict does not change a combination's settings: the model must be
        built with the combination it was saved with, so a difference is an error (the
        weights were trained for the saved settings).

        Raises
        ------
        CombinationError
            If the saved name or a saved parameter differs from this combination's, or
            the saved state is not what :meth:`get_extra_state` writes. The message names
            the field, the saved value and the current one.
        """
        if not (
            isinstance(state, Mapping)
            and isinstance(state.get("name"), str)
            and isinstance(state.get("params"), Mapping)
        ):
            raise CombinationError(
                f"the state_dict's combination state {state!r} is not a mapping "
                "{'name': str, 'params': {...}} as Combination.get_extra_state writes it"
            )
        saved = {"name": state["name"], **state["params"]}
        build = (
            f"build the model with the saved combination, MultiPoseModel(model, {saved!r}), "
            "and load again"
        )
        if normalize_name(state["name"]) not in {
            normalize_name(n) for n in (self.name, *self.aliases, *self.deprecated_aliases)
        }:
            raise CombinationError(
                f"the state_dict was saved with combination {state['name']!r}, but this "
                f"model's combination is {self.name!r}; {build}"
            )
        current = self.params.model_dump(mode="json")
        for field, value in state["params"].items():
            if field not in current:
                raise CombinationError(
                    f"the state_dict's combination {self.name!r} has parameter {field!r} "
                    f"(= {value!r}), which this version of {type(self).__name__} does not "
                    f"know (it has {sorted(current)}); {build}"
                )
            if current[field] != value:
                raise CombinationError(
                    f"the state_dict was saved with {self.name}'s {field}={value!r}, but "
                    f"this model's combination has {field}={current[field]!r}; {build}"
                )

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Load as torch does; a state_dict without the combination's state still loads.

        state_dicts saved before the combination carried its settings have no
        ``_extra_state`` key; they load (strictly too) into the combination as built.
        """
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        key = prefix + "_extra_state"
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)

    def extra_repr(self) -> str:
        """Show the parameters in the module's repr."""
        return ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())

    # ---- the math a plugin supplies -----------------------------------------------
    @abstractmethod
    def value(self, preds: Tensor) -> Tensor:
        r"""Return :math:`h(y)` as a 0-d tensor, for one compound's ``preds`` of shape ``(N,)``."""

    def segment_value(self, preds: Tensor, index: Tensor, num_segments: int) -> Tensor:
        r"""Return :math:`h` of every compound of a batch, shape ``(num_segments,)``.

        The default calls :meth:`value` once per compound (a Python loop, one host sync);
        a combination written with the reductions of :mod:`combframe.segment` evaluates
        a whole batch at once. Both are ordinary autograd on the ``M`` predictions.

        Parameters
        ----------
        preds
            The per-pose predictions of all compounds, flat, shape ``(M,)``.
        index
            The compound of each pose, shape ``(M,)``, sorted: the poses of one compound
            are contiguous and every compound has at least one pose.
        num_segments
            The number of compounds ``C``.
        """
        sizes = torch.bincount(index, minlength=num_segments).tolist()
        return torch.stack([self.value(p) for p in preds.split(sizes)])

    def pose_weights(self, preds: Tensor, combined: Tensor) -> Tensor:
        r"""Return :math:`\partial h/\partial y_i` (shape ``(N,)``) for ``combined = h(preds)``.

        The default differentiates :meth:`value` with autograd on the detached N-vector
        of predictions (it never touches the model); a closed form may replace it.
        """
        with torch.enable_grad():
            y = preds.detach().requires_grad_(True)
            (weights,) = torch.autograd.grad(self.value(y), y)
        return weights

    # ---- the mtenn-compatible call ------------------------------------------------
    def forward(
        self,
        pred_list: Sequence[Tensor] | Tensor,
        grad_dict: Mapping[str, Sequence[Tensor | None]] | PoseGradients,
        param_names: Sequence[str],
        *model_params: Tensor,
    ) -> tuple[Tensor, Tensor]:
        r"""Combine per-pose predictions with the mtenn ``Combination.forward`` signature.

        Parameters
        ----------
        pred_list
            N per-pose predictions (each with one element), or a tensor of N elements.
        grad_dict
            Parameter name to a list of N detached per-pose gradients
            :math:`\partial y_i/\partial\theta` (empty when nothing needs gradients). An
            entry may be ``None`` (what ``torch.autograd.grad(..., allow_unused=True)``
            gives for a parameter that pose does not use): it counts as zeros, and a
            parameter with only ``None`` entries gets no gradient, as with autograd.
        param_names
            Names of ``model_params``, in the same order; every name is a key of
            ``grad_dict``.
        *model_params
            The model parameters the gradients belong to; gradients flow to them.

        Returns
        -------
        combined, per_pose
            The combined prediction (0-d) and the per-pose predictions, shape ``(N,)``.
            The backward uses the combination's parameters as they were in this call (a
            value changed before ``backward()`` does not count), and the combination's
            own trainable parameters (an ``nn.Parameter`` it holds) get their gradient.

        Raises
        ------
        CombinationError
            Before any work, if ``grad_dict`` does not match ``param_names`` and
            ``model_params`` (missing or extra names, not N entries per name, an entry
            that is neither a tensor nor ``None``, a gradient of the wrong size).
        """
        if _mtenn_call is None:
            raise TypeError(
                "mtenn's call (pred_list, grad_dict, param_names, *model_params) is "
                "provided by combframe.mtenn, installed when combframe.registry is "
                "imported; import combframe.registry first, or use combframe's public API"
            )
        return _mtenn_call(self, pred_list, grad_dict, param_names, *model_params)


def normalize_name(name: str) -> str:
    """Case-fold a combination name and treat ``-`` and ``_`` alike.

    >>> normalize_name(" Smooth-Max ")
    'smooth_max'
    """
    return name.strip().lower().replace("-", "_")


_resolver: Callable[[Any], Combination] | None = None
_mtenn_call: Callable[..., tuple[Tensor, Tensor]] | None = None


def set_resolver(resolver: Callable[[Any], Combination]) -> None:
    """Install how a name, mapping or config becomes a combination (the registry's).

    The core never imports the registry; :mod:`combframe.registry` installs its
    resolver when imported, so that :class:`~combframe.MultiPoseModel` accepts names.
    """
    global _resolver
    _resolver = resolver


def set_mtenn_call(call: Callable[..., tuple[Tensor, Tensor]]) -> None:
    """Install what :meth:`Combination.forward` runs for mtenn's call (the registry does).

    The call lives in :mod:`combframe.mtenn.function`, outside the core, which never
    imports it: the registry installs it when imported, beside its resolver.
    """
    global _mtenn_call
    _mtenn_call = call


def as_combination(spec: Any) -> Combination:
    """Return ``spec`` if it is a combination, else what the installed resolver makes of it."""
    if isinstance(spec, Combination):
        return spec
    if _resolver is None:
        raise TypeError(
            f"cannot turn {spec!r} into a combination: names and configs are resolved by "
            "combframe's registry, which is not loaded. Use combframe.MultiPoseModel (it "
            "loads it), import combframe.registry first, or pass a combframe.Combination"
        )
    return _resolver(spec)
