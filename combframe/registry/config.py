"""``CombinationConfig``: a combination chosen by name in a pydantic config, and its schema.

Both are built from the registry when used, so a third-party plugin's combinations are
accepted (and appear in the schema) once it is installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError, core_schema

from combframe.core.combination import Combination, CombinationParams
from combframe.core.settings import learnable_fields
from combframe.errors import CombinationError, InvalidParametersError, UnknownCombinationError
from combframe.registry import CombinationInfo, _checked, create_combination, current_registry
from combframe.registry.plugins import class_of

__all__ = ["CombinationConfig", "combination_config_schema"]

_NAME = "Registered name of the combination."


def _error(loc: str, kind: str, message: str, value: Any) -> ValidationError:
    details = InitErrorDetails(type=PydanticCustomError(kind, message), loc=(loc,), input=value)
    return ValidationError.from_exception_data("CombinationConfig", [details])


class CombinationConfig(BaseModel):
    r"""A combination and its parameters: ``{"name": ..., <parameters>}``.

    The name is looked up in the registry (aliases accepted) and the other keys are
    validated by that combination's ``Params`` (unknown keys rejected, bounds enforced);
    the validated config holds the canonical name and every parameter. It round-trips
    through JSON and YAML and works as a field of your own pydantic model.

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

    name: str = Field(description=_NAME)

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
        params, registry = dict(data), current_registry()
        if "name" not in params:
            installed = ", ".join(registry.names()) or "none"
            message = f"a combination config needs a 'name' (installed: {installed})"
            raise _error("name", "missing_combination_name", message, data)
        name = params.pop("name")
        if not isinstance(name, str):
            raise _error("name", "string_type", "the combination name must be a string", name)
        try:
            canonical, _, values, learned = _checked(name, params)
        except UnknownCombinationError as exc:
            raise _error("name", "unknown_combination", str(exc), name) from None
        except InvalidParametersError:
            raise  # a ValidationError: pydantic keeps its fields' locations
        except CombinationError as exc:
            learn = data.get("learn")
            raise _error("learn", "unknown_learned_parameter", str(exc), learn) from None
        learn_key = {"learn": list(learned)} if learned else {}
        return {"name": canonical, **values.model_dump(), **learn_key}

    @property
    def params(self) -> CombinationParams:
        """The validated parameters, as the combination's own ``Params`` model."""
        extra = {k: v for k, v in (self.model_extra or {}).items() if k != "learn"}
        return current_registry().get(self.name).Params.model_validate(extra)

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
        return handler(pydantic.TypeAdapter(_union_type()).core_schema)


def _variant(info: CombinationInfo) -> Any:
    """Make the config model of one combination: its ``Params``, ``name`` and ``learn``."""
    cls, names = class_of(info), (info.name, *info.aliases)
    learnable = learnable_fields(cls.Params)
    fields: dict[str, Any] = {"name": (Literal.__getitem__(names), Field(description=_NAME))}
    if learnable:
        fields["learn"] = (
            list[Literal.__getitem__(learnable)],  # type: ignore[misc]  # built at runtime
            Field(
                default_factory=list,
                description="Parameters to learn (an nn.Parameter each, kept in bounds).",
            ),
        )
    doc = info.description or None
    return pydantic.create_model(
        f"{cls.__name__}Config", __base__=cls.Params, __doc__=doc, **fields
    )


def _union_type() -> Any:
    """Return the discriminated union of every installed combination's config model."""
    table = current_registry().table()
    if table.schema_type is None:
        variants = [_variant(info) for info in table.infos()]
        if not variants:
            raise UnknownCombinationError("<any>", [], None)
        union: Any = Union[tuple(variants)]  # noqa: UP007 - built at runtime
        one = len(variants) == 1
        table.schema_type = union if one else Annotated[union, Field(discriminator="name")]
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
    schema.setdefault("description", "A combframe combination chosen by name, with its parameters.")
    return schema
