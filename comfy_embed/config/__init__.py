"""Settings: one frozen object, built once from the environment and passed in.

Nothing else in comfy-embed reads the environment (apart from storage
credentials, which are asked for on each request so rotated STS tokens work).

``Settings`` is a pydantic-settings model composed of one frozen model per
concern (``settings.comfy``, ``settings.jobs``, ``settings.webhooks``...).
Every field also has a flat name, unique across the groups: its
``COMFY_EMBED_<FLAT NAME>`` variable, and the keyword that sets it
(``Settings(max_queue=5)``, ``settings.replace(webhook_max_attempts=3)``);
:meth:`Settings.flat_fields` maps each to its group and field. Numbers are
checked beyond their types in one table (:data:`rules.RULES`, by flat name), and
a bad value raises :class:`SettingsError` naming its variable, so a
misconfigured instance stops at start-up instead of failing on a request.
Each setting is, in this order: a keyword argument (``Settings(base_dir=...)``,
or a field that a group given whole sets), else its ``COMFY_EMBED_*`` variable
(:class:`EnvironmentSource` over ``os.environ``), else its default; so
``Settings(base_dir=...)`` still takes ``COMFY_EMBED_COMFYUI_DIR``.
:meth:`Settings.from_env` reads an explicit mapping instead (or ``os.environ``);
:meth:`Settings.replace` copies and reads no environment.

Text in the environment: lists are comma- (or semicolon-) separated; an
empty value means none for a setting that may be none, ``""`` for text,
an empty list, false for a switch, and is an error for a number or a
required path; ``none`` or ``off`` is none for an optional number.

The package: ``rules`` (the checks, and the helpers they share), ``places``
(default folders, checkout or installed wheel; the pinned ComfyUI), ``groups``
(one model per concern), ``names`` (flat names, and errors that use them),
``environment`` (the ``COMFY_EMBED_*`` source) and ``settings`` (Settings).
"""

from comfy_embed.config.environment import EnvironmentSource
from comfy_embed.config.groups import (
    ComfySettings,
    InputSettings,
    JobSettings,
    ModelSettings,
    ObserveSettings,
    SafetySettings,
    ServerSettings,
    StorageSettings,
    TaskLogSettings,
    WebhookSettings,
)
from comfy_embed.config.rules import (
    PROJECT_ROOT,
    SettingsError,
    storage_backends,
    webhook_secret_key,
)
from comfy_embed.config.settings import Settings

__all__ = [
    "PROJECT_ROOT",
    "ComfySettings",
    "EnvironmentSource",
    "InputSettings",
    "JobSettings",
    "ModelSettings",
    "ObserveSettings",
    "SafetySettings",
    "ServerSettings",
    "Settings",
    "SettingsError",
    "StorageSettings",
    "TaskLogSettings",
    "WebhookSettings",
    "storage_backends",
    "webhook_secret_key",
]
