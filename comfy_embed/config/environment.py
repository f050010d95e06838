"""Settings read from an environment mapping (``COMFY_EMBED_*`` text)."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Collection, Mapping

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from comfy_embed.config.names import group_fields
from comfy_embed.config.rules import PREFIX, SettingsError

#: Variables read, in order, when a setting's own ``COMFY_EMBED_`` one is absent.
FALLBACKS: dict[str, tuple[str, ...]] = {"port": ("FC_SERVER_PORT",)}


class EnvironmentSource(PydanticBaseSettingsSource):
    """The settings set in an environment mapping: each ``COMFY_EMBED_<FLAT NAME>``
    present, in the text forms of this module's docstring, as one dict per group."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str],
                 skip: Collection[str] = ()) -> None:
        super().__init__(settings_cls)
        self.env = env
        #: Flat names set by keyword: their variables are not read (nor refused).
        self.skip = frozenset(skip)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """The text set for the flat name ``field_name``, and the variable it came from."""
        var = PREFIX + field_name.upper()
        if var not in self.env:
            var = next((v for v in FALLBACKS.get(field_name, ()) if v in self.env), var)
        return self.env.get(var), var, False

    def prepare_field_value(self, field_name: str, field: FieldInfo, value: Any,
                            value_is_complex: bool) -> Any:
        return from_text(field.annotation, value)

    def __call__(self) -> dict[str, Any]:
        groups: dict[str, dict[str, object]] = {}
        for group, _, flat, field in group_fields(self.settings_cls):
            if flat in self.skip:
                continue
            raw, var, _ = self.get_field_value(field, flat)
            if raw is None:
                continue
            try:
                value = self.prepare_field_value(flat, field, raw, False)
            except ValueError as e:
                raise SettingsError(f"{var}={raw!r}: {e}") from None
            groups.setdefault(group, {})[flat] = value
        return groups


def from_text(annotation: Any, raw: str) -> object:
    """An environment string as the value for a field of type ``annotation``;
    pydantic then checks and converts it like any other value."""
    args = typing.get_args(annotation)
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    optional = union and type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if union else annotation
    origin = typing.get_origin(base) or base
    text = raw.strip()
    if origin is tuple:
        return tuple(x.strip() for x in text.replace(";", ",").split(",") if x.strip())
    if not text:
        if optional:
            return None
        if base is str:
            return raw
        if base is bool:
            return False
        raise ValueError("empty; expected " + {int: "an integer", float: "a number",
                                              Path: "a path"}.get(base, "a value"))
    if optional and base in (int, float) and text.lower() in ("none", "off"):
        return None
    return raw if base is str else text
