"""Settings: the groups composed, flat names routed to them, built from
keywords or (once, by ``from_env``) the environment."""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from comfy_embed.config.environment import EnvironmentSource
from comfy_embed.config.groups import (
    AppsSettings,
    ComfySettings,
    InputSettings,
    JobSettings,
    ModelSettings,
    ObserveSettings,
    SafetySettings,
    ServerSettings,
    StorageSettings,
    TaskLogSettings,
    V2Settings,
    WebhookSettings,
)
from comfy_embed.config.names import describe, flat_fields
from comfy_embed.config.rules import SettingsError, flat_name


class Settings(BaseSettings):
    """Everything configurable, one model per concern; see README for the
    COMFY_EMBED_* names.

    Each setting comes from, in this order: a keyword argument (a flat name,
    or a field a group given whole sets), else its ``COMFY_EMBED_<FLAT NAME>``
    variable in ``os.environ``, else its default. So ``Settings(base_dir=...)``
    still takes ``COMFY_EMBED_COMFYUI_DIR``. A field added to a group is read
    from its variable, set by its flat keyword and type-checked with no more code.
    """

    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    comfy: ComfySettings = Field(default_factory=ComfySettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    inputs: InputSettings = Field(default_factory=InputSettings)
    #: ``store``, not ``storage``: that flat name is the backend's (COMFY_EMBED_STORAGE).
    store: StorageSettings = Field(default_factory=StorageSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    observe: ObserveSettings = Field(default_factory=ObserveSettings)
    tasklog: TaskLogSettings = Field(default_factory=TaskLogSettings)
    safety: SafetySettings = Field(default_factory=SafetySettings)
    v2: V2Settings = Field(default_factory=V2Settings)
    apps: AppsSettings = Field(default_factory=AppsSettings)

    @property
    def task_log_path(self) -> Path:
        """The task log folder: ``COMFY_EMBED_TASK_LOG_DIR``, else <output>/serverless_api."""
        return (self.tasklog.dir or self.comfy.output_path / "serverless_api").resolve()

    @property
    def apps_path(self) -> Path:
        """The apps folder: ``COMFY_EMBED_APPS_DIR``, else <base>/apps."""
        return (self.apps.dir or self.comfy.base_dir / "apps").resolve()

    @classmethod
    def flat_fields(cls) -> Mapping[str, tuple[str, str]]:
        """Every flat name (the ``COMFY_EMBED_<NAME>`` variable, lower-case, and
        the keyword) -> (group, field): ``"webhook_max_attempts"`` ->
        ``("webhooks", "max_attempts")``."""
        return types.MappingProxyType(flat_fields(cls))

    # --- pydantic hooks ----------------------------------------------------------
    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise SettingsError(describe(type(self), e)) from None

    @model_validator(mode="before")
    @classmethod
    def _route(cls, data: Any) -> Any:
        """Flat names into their groups: ``max_queue=5`` -> ``jobs={"max_queue": 5}``.
        A flat name wins over its field in a group given whole in the same call."""
        if not isinstance(data, dict):
            return data
        fields = flat_fields(cls)
        routed = dict(data)
        for flat in data.keys() & fields.keys():
            (group, name), value = fields[flat], routed.pop(flat)
            base = routed.get(group) or {}
            if isinstance(base, BaseModel):
                base = base.model_dump(by_alias=True)
            if isinstance(base, Mapping):
                routed[group] = {**{k: v for k, v in base.items() if k != name}, flat: value}
        return routed

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Keywords over COMFY_EMBED_* over defaults, field by field.
        kwargs = init_settings.init_kwargs if isinstance(init_settings, InitSettingsSource) else {}
        given = explicit_fields(settings_cls, kwargs)
        return (InitSettingsSource(settings_cls, init_kwargs=given),
                EnvironmentSource(settings_cls, os.environ, skip=keyword_names(given)))

    def replace(self, **changes: object) -> Settings:
        """A copy with some settings changed, by flat name (``max_queue=3``) or
        whole group (``jobs=...``); the changed groups are checked again. The
        environment is not read again: the rest is this object's."""
        values = {**{group: getattr(self, group) for group in type(self).model_fields}, **changes}
        return type(self)(_build_sources=((InitSettingsSource(type(self), init_kwargs=values),),
                                          values))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read ``COMFY_EMBED_<FLAT NAME>`` (upper-case) for every setting, from
        ``env`` (default: ``os.environ``).

        ``FC_SERVER_PORT`` (Function Compute) sets the port when
        ``COMFY_EMBED_PORT`` is absent. Keyword overrides win over both.
        Raises SettingsError naming the variable of a bad value. Without
        ``env`` this is ``Settings(**overrides)``.
        """
        given = explicit_fields(cls, overrides)
        sources = (InitSettingsSource(cls, init_kwargs=given),
                   EnvironmentSource(cls, os.environ if env is None else env,
                                     skip=keyword_names(given)))
        return cls(_build_sources=(sources, overrides))


def explicit_fields(settings_cls: type[BaseSettings], values: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments with each group given whole (a model or a dict) cut
    down to the fields it sets, by flat name: the environment then fills in
    the others field by field instead of losing to the group's defaults."""
    out = dict(values)
    for group, holder in settings_cls.model_fields.items():
        value = out.get(group)
        if isinstance(value, BaseModel):
            value = value.model_dump(exclude_unset=True, by_alias=True)
        if isinstance(value, Mapping):
            fields = typing.cast("type[BaseModel]", holder.annotation).model_fields
            out[group] = {flat_name(k, fields[k]) if k in fields else k: v
                          for k, v in value.items()}
    return out


def keyword_names(given: Mapping[str, Any]) -> set[str]:
    """The flat names that keywords (after :func:`explicit_fields`) set."""
    names = {name for name, value in given.items() if not isinstance(value, Mapping)}
    for value in given.values():
        if isinstance(value, Mapping):
            names.update(value)
    return names
