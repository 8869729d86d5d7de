"""``CombinationConfig``: a combination chosen by name in a pydantic config.

The parameters are validated against the named plugin's own ``Params`` model, so a
config accepts exactly what the installed combinations accept, including combinations
that arrive with third-party plugins. The JSON schema is a discriminated union over the
installed combinations, built from the registry at the time it is asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError, core_schema

from combframe.core.combination import Combination, CombinationParams
from combframe.core.settings import checked_learn, learnable_fields
from combframe.errors import CombinationError, UnknownCombinationError
from combframe.registry import create_combination, current_registry

__all__ = ["CombinationConfig", "combination_config_schema"]


def _error(loc: tuple[str, ...], kind: str, message: str, value: Any) -> ValidationError:
    details = InitErrorDetails(type=PydanticCustomError(kind, message), loc=loc, input=value)
    return ValidationError.from_exception_data("CombinationConfig", [details])


class CombinationConfig(BaseModel):
    r"""A combination and its parameters: ``{"name": ..., <parameters>}``.

    The name is looked up in the registry (case-insensitive, ``-`` and ``_`` alike,
    aliases accepted) and the remaining keys are validated by that combination's
    ``Params`` model: unknown keys are rejected and bounds enforced, with pydantic errors
    that name the field. After validation the config holds the canonical name and every
    parameter (defaults filled in), so it serializes to a complete description.

    Works as a field in your own pydantic model and round-trips through JSON
    (:meth:`model_dump_json` / :meth:`model_validate_json`) and YAML (:meth:`to_yaml` /
    :meth:`from_yaml`). A combination object converts back with
    :meth:`from_combination`; :meth:`build` makes the module.

    Examples
    --------
    >>> import combframe
    >>> config = combframe.CombinationConfig(name="max", pred_scale=100)
    >>> config.model_dump()
    {'name': 'max', 'negate_preds': True, 'pred_scale': 100.0}
    >>> config.build()
    MaxCombination(negate_preds=True, pred_scale=100.0)
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(description="Registered name of the combination.")

    if TYPE_CHECKING:  # the parameters are extra keywords, checked at runtime

        def __init__(self, *, name: str, **params: Any) -> None: ...

    @model_validator(mode="before")
    @classmethod
    def _validate_against_plugin(cls, data: Any) -> Any:
        if isinstance(data, CombinationConfig):
            return data.model_dump()
        if isinstance(data, Combination):
            data = data.to_config()
        if not isinstance(data, Mapping):
            raise PydanticCustomError(
                "combination_config_type",
                "a combination config is a mapping with a 'name' key and the "
                "combination's parameters; got {kind}",
                {"kind": type(data).__name__},
            )
        params = dict(data)
        if "name" not in params:
            raise _error(
                ("name",),
                "missing_combination_name",
                "a combination config needs a 'name' (installed: {})".format(
                    ", ".join(current_registry().names()) or "none"
                ),
                data,
            )
        name = params.pop("name")
        if not isinstance(name, str):
            raise _error(("name",), "string_type", "the combination name must be a string", name)
        registry = current_registry()
        try:
            canonical, cls_ = registry.resolve(name)
        except UnknownCombinationError as exc:
            raise _error(("name",), "unknown_combination", str(exc), name) from None
        learn = params.pop("learn", None) or ()
        validated = cls_.Params.model_validate(params)
        try:
            learned = checked_learn(canonical, cls_.Params, learn)
        except CombinationError as exc:
            raise _error(("learn",), "unknown_learned_parameter", str(exc), learn) from None
        return {"name": canonical, **validated.model_dump(), **_learn_key(learned)}

    @property
    def params(self) -> CombinationParams:
        """The validated parameters, as the combination's own ``Params`` model."""
        cls_ = current_registry().get(self.name)
        extra = {k: v for k, v in (self.model_extra or {}).items() if k != "learn"}
        return cls_.Params.model_validate(extra)

    @property
    def learn(self) -> tuple[str, ...]:
        """The names of the parameters learned (``learn: [kT]``); empty when none."""
        return tuple((self.model_extra or {}).get("learn", ()))

    def build(self) -> Combination:
        """Create the combination module these parameters describe."""
        return create_combination(self)

    @classmethod
    def from_combination(cls, combination: Combination) -> CombinationConfig:
        """Return the config of an existing combination object (its name and parameters)."""
        return cls.model_validate(combination.to_config())

    def to_yaml(self) -> str:
        """YAML text of this config (a mapping with ``name`` first)."""
        import yaml

        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> CombinationConfig:
        """Parse and validate YAML text written by :meth:`to_yaml` (or by hand)."""
        import yaml

        return cls.model_validate(yaml.safe_load(text))

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        # In a user's model the field's schema is the union over installed combinations.
        adapter = pydantic.TypeAdapter(_union_type())
        return handler(adapter.core_schema)


def _learn_key(learned: tuple[str, ...]) -> dict[str, list[str]]:
    """Return the ``learn`` key of a config: present only when a parameter is learned."""
    return {"learn": list(learned)} if learned else {}


def _variant(name: str, aliases: tuple[str, ...], combination: type[Combination]) -> Any:
    """Make a pydantic model for one combination: its ``Params`` and a literal ``name``.

    A combination with learnable parameters also gets ``learn``, a list of their names.
    """
    names = (name, *aliases)
    literal: Any = Literal.__getitem__(names)
    description = (combination.__doc__ or "").strip().splitlines()
    learnable = learnable_fields(combination.Params)
    fields: dict[str, Any] = {
        "name": (literal, Field(description="Registered name of the combination.")),
    }
    if learnable:
        fields["learn"] = (
            list[Literal.__getitem__(learnable)],  # type: ignore[misc]  # built at runtime
            Field(
                default_factory=list,
                description="Parameters to learn (an nn.Parameter each, kept in bounds).",
            ),
        )
    return pydantic.create_model(
        f"{combination.__name__}Config",
        __base__=combination.Params,
        __doc__=description[0] if description else None,
        **fields,
    )


def _union_type() -> Any:
    """Return the discriminated union of every installed combination's config model."""
    registry = current_registry()
    table = registry.table()
    if table.schema_type is None:
        infos = registry.describe()
        variants = [
            _variant(info.name, info.aliases, table.entries[info.name].cls) for info in infos
        ]
        if not variants:
            raise UnknownCombinationError("<any>", [], None)
        if len(variants) == 1:
            table.schema_type = variants[0]
        else:
            table.schema_type = Annotated[
                Union[tuple(variants)],  # noqa: UP007 - built at runtime
                Field(discriminator="name"),
            ]
    return table.schema_type


def combination_config_schema() -> dict[str, Any]:
    """JSON schema of :class:`CombinationConfig` for the installed combinations.

    A discriminated union (``oneOf`` with ``discriminator`` on ``name``) of one object
    per combination, with its parameters, types, defaults, bounds and descriptions;
    built from the registry, so third-party plugins appear once installed.

    Raises
    ------
    UnknownCombinationError
        If no combination is installed at all.
    """
    schema: dict[str, Any] = pydantic.TypeAdapter(_union_type()).json_schema()
    schema.setdefault("title", "CombinationConfig")
    schema.setdefault(
        "description",
        "A combframe combination chosen by name, with its parameters.",
    )
    return schema
