"""Flat names: each group field's one name across all groups (its variable,
its keyword), and errors described by them."""

from __future__ import annotations

import difflib
import functools
import typing
from typing import Iterable

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from comfy_embed.config.rules import PREFIX, SettingsError, flat_name


@functools.cache
def flat_fields(settings_cls: type[BaseSettings]) -> dict[str, tuple[str, str]]:
    """Flat name -> (group, field), read off the group models."""
    fields: dict[str, tuple[str, str]] = {}
    for group, name, flat, _ in group_fields(settings_cls):
        if flat in fields or flat in settings_cls.model_fields:  # a keyword must mean one thing
            raise TypeError(f"two settings are named {flat!r}: {group}.{name} and "
                            f"{fields.get(flat, flat)}")
        fields[flat] = (group, name)
    return fields


def group_fields(settings_cls: type[BaseSettings]) -> Iterable[tuple[str, str, str, FieldInfo]]:
    """(group, field, flat name, field info) for every field of every group."""
    for group, holder in settings_cls.model_fields.items():
        for name, field in typing.cast("type[BaseModel]", holder.annotation).model_fields.items():
            yield group, name, flat_name(name, field), field




def describe(settings_cls: type[BaseSettings], error: ValidationError) -> str:
    """One line per bad setting, each naming its variable."""
    fields = flat_fields(settings_cls)
    flat_of = {where: flat for flat, where in fields.items()}
    lines = []
    for item in error.errors():
        loc = tuple(str(part) for part in item["loc"])
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, SettingsError):  # a check of RULES: it names the variable
            lines.append(str(cause))
        elif item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc[-1], [*fields, *settings_cls.model_fields], n=1)
            lines.append(f"unknown setting {'.'.join(loc)!r}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
        elif len(loc) > 1:  # a group's field, by flat name (or by its name in a group given whole)
            flat = loc[1] if loc[1] in fields else flat_of.get((loc[0], loc[1]), loc[1])
            lines.append(f"{PREFIX}{flat.upper()}={item.get('input')!r}: {item['msg']}")
        else:
            lines.append(f"{'.'.join(loc) or 'settings'}={item.get('input')!r}: {item['msg']}")
    return "; ".join(lines)
