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
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Generic

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor
from typing_extensions import TypeVar

from combframe.core.gradients import PoseGradients
from combframe.core.settings import (
    check_saved,
    checked_learn,
    constrain,
    normalize_name,
    unconstrain,
    validated,
)
from combframe.core.streaming import StreamingCombination

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
    takes_prior
        Whether ``value`` takes ``prior=``, per-pose log weights (:mod:`combframe.core.weights`).
    pools
        Whether ``value`` pools vector outputs, coupling their columns (attention), rather
        than combining each column on its own as every reduction over dim 0 does (mean,
        max, Boltzmann on ``(N, d)`` predictions). A pooling combination writes
        :meth:`pool_weights`.
    Params
        The parameter model, taken from the brackets.
    params
        This instance's parameters; a learned one is its current value, a 0-d tensor.
    learn
        The parameters learned (``learn=[...]``): each an ``nn.Parameter`` ``raw_<field>``
        under a parametrization keeping its bounds
        (:func:`combframe.core.settings.learnable_fields`).
    """

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    deprecated_aliases: ClassVar[tuple[str, ...]] = ()
    mtenn_fields: ClassVar[Mapping[str, str]] = {}
    takes_prior: ClassVar[bool] = False
    pools: ClassVar[bool] = False
    Params: ClassVar[type[CombinationParams]] = CombinationParams

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in cls.__dict__.get("__orig_bases__", ()):
            args = typing.get_args(base)
            if args and isinstance(args[0], type) and issubclass(args[0], CombinationParams):
                cls.Params = args[0]
        cls.takes_prior = "prior" in inspect.signature(cls.value).parameters
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

    def __init__(self, *args: Any, learn: Iterable[str] = (), **kwargs: Any) -> None:
        """Validate the parameters (positional in ``Params`` order, or by keyword); ``learn``."""
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
        object.__setattr__(self, "_settings", validated(self.Params, kwargs))
        object.__setattr__(self, "_learned", checked_learn(self.name, self.Params, learn))
        for field in self.learn:
            start = getattr(self.__dict__["_settings"], field)
            raw = unconstrain(self.Params.model_fields[field], field, start)
            self.register_parameter(f"raw_{field}", torch.nn.Parameter(torch.tensor(raw)))
        self.build()

    def build(self) -> None:
        """Make the combination's own layers from its parameters (attention's); none by default.

        Called once, at the end of ``__init__``: a plugin with trainable layers makes them
        here (``self.V = torch.nn.Linear(self.params.dim, ...)``) and keeps the class's
        signature, the ``Params`` fields.
        """

    @property
    def params(self) -> P:
        """The parameters; a learned one is its current value, a 0-d tensor with a graph."""
        settings: P = self.__dict__["_settings"]
        fields, raw = self.Params.model_fields, self.__getattr__
        values = {f: constrain(fields[f], raw(f"raw_{f}")) for f in self.learn}
        return settings.model_copy(update=values) if values else settings  # tensors unvalidated

    @property
    def learn(self) -> tuple[str, ...]:
        """The names of the learned parameters, in ``Params`` field order."""
        return tuple(self.__dict__["_learned"])

    def settings(self) -> P:
        """Return the parameters as plain values, a learned one read now (a device sync).

        What :meth:`to_config`, the state_dict's combination state and the repr show.
        """
        with torch.no_grad():
            values = {f: float(getattr(self.params, f)) for f in self.learn}
        settings: P = self.__dict__["_settings"]
        return settings.model_copy(update=values) if values else settings

    def __getattr__(self, item: str) -> Any:
        """Read a parameter as an attribute (``comb.pred_scale``)."""
        if "_settings" in self.__dict__ and item in self.Params.model_fields:
            return getattr(self.params, item)
        return super().__getattr__(item)

    def __setattr__(self, key: str, value: Any) -> None:
        """Assign a parameter (a learned one's ``nn.Parameter`` too), validated first."""
        if key in type(self).Params.model_fields and "_settings" in self.__dict__:
            new = dict(self.settings())
            new[key] = value
            settings = validated(self.Params, new)
            if key in self.learn:
                raw = unconstrain(self.Params.model_fields[key], key, getattr(settings, key))
                with torch.no_grad():
                    self.__getattr__(f"raw_{key}").fill_(raw)
            object.__setattr__(self, "_settings", settings)
            return
        super().__setattr__(key, value)

    def hyperparameters(self) -> tuple[Any, ...]:
        """Return the parameter values in ``Params`` field order."""
        return tuple(getattr(self.params, f) for f in type(self.params).model_fields)

    def to_config(self) -> dict[str, Any]:
        """Return ``{"name": ..., <params>}`` (and ``"learn"``); learned values as now."""
        learn = {"learn": list(self.learn)} if self.learn else {}
        return {"name": self.name, **self.settings().model_dump(), **learn}

    # ---- the settings in a state_dict ---------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        """Return the name and parameters that ``state_dict()`` carries (``_extra_state``).

        Plain dicts, strings and numbers: ``torch.load(..., weights_only=True)`` reads it.
        """
        state = {"name": self.name, "params": self.settings().model_dump(mode="json")}
        return {**state, "learn": list(self.learn)} if self.learn else state

    def set_extra_state(self, state: Any) -> None:
        """Check a ``state_dict``'s combination against this one; raise if they differ.

        Loading does not change the settings (the weights were trained for the saved
        ones), so the model must be built with them; learned values load as weights.

        Raises
        ------
        CombinationError
            If the name, a parameter or the learned ones differ, or the state is not what
            :meth:`get_extra_state` writes; the message names the field and both values.
        """
        names = {normalize_name(n) for n in (self.name, *self.aliases, *self.deprecated_aliases)}
        current = self.settings().model_dump(mode="json")
        check_saved(state, self.name, names, type(self).__name__, current, self.learn)

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
        """Show the parameters (a learned one's current value) in the module's repr."""
        shown = [f"{k}={v!r}" for k, v in self.settings().model_dump().items()]
        return ", ".join(shown + ([f"learn={list(self.learn)!r}"] if self.learn else []))

    # ---- the math a plugin supplies -----------------------------------------------
    @abstractmethod
    def value(self, preds: Tensor) -> Tensor:
        r"""Return :math:`h(y)` for one compound's ``preds``.

        ``preds`` is ``(N,)`` (one value per pose; return a 0-d tensor) or ``(N, d)`` (a
        vector per pose; return ``(d,)``, or ``(d_out,)`` for a pooling combination).
        Written with reductions over dim 0, a combination combines each column on its own.
        """

    def segment_value(
        self, preds: Tensor, index: Tensor, num_segments: int, prior: Tensor | None = None
    ) -> Tensor:
        r"""Return :math:`h` of every compound of a batch, shape ``(num_segments, ...)``.

        The default calls :meth:`value` once per compound (a Python loop, one host sync);
        a combination written with the reductions of :mod:`combframe.segment` evaluates
        a whole batch at once. Both are ordinary autograd on the ``M`` predictions.

        Parameters
        ----------
        preds
            The per-pose predictions of all compounds, flat, shape ``(M,)`` or ``(M, d)``.
        index
            The compound of each pose, shape ``(M,)``, sorted: the poses of one compound
            are contiguous and every compound has at least one pose.
        num_segments
            The number of compounds ``C``.
        prior
            Given only to a combination that ``takes_prior``: ``(M,)`` log weights.
        """
        sizes = torch.bincount(index, minlength=num_segments).tolist()
        if prior is None:
            return torch.stack([self.value(y) for y in preds.split(sizes)])
        value: Callable[..., Tensor] = self.value  # takes prior= (takes_prior)
        pairs = zip(preds.split(sizes), prior.split(sizes), strict=True)
        return torch.stack([value(y, prior=q) for y, q in pairs])

    def pool_weights(
        self, preds: Tensor, index: Tensor, num_segments: int, prior: Tensor | None = None
    ) -> Tensor:
        r"""Return each pose's weight in a pooled value, shape ``(M,)`` (pooling only).

        A pooling combination (``pools = True``) says here which pose it picked for
        :func:`combframe.pose_weights` with ``(M, d)`` predictions: attention returns its
        softmax weights :math:`\alpha_i`. Arguments as :meth:`segment_value`'s.
        """
        raise NotImplementedError(
            f"combination {self.name!r} sets pools = True but does not write pool_weights"
        )

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
            :math:`\partial y_i/\partial\theta`; a ``None`` entry (a parameter that pose
            does not use) counts as zeros.
        param_names, *model_params
            The model parameters the gradients belong to, and their names (keys of
            ``grad_dict``); gradients flow to them.

        Returns
        -------
        combined, per_pose
            The combined prediction (0-d) and the per-pose predictions, shape ``(N,)``;
            the combination's own parameters get their gradient too.

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
