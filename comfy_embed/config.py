"""Settings: one frozen object, built once from the environment and passed in.

Nothing else in comfy-embed reads the environment (apart from storage
credentials, which are asked for on each request so rotated STS tokens work).

``Settings`` is a pydantic-settings model composed of one frozen model per
concern (``settings.comfy``, ``settings.jobs``, ``settings.webhooks``...).
Every field also has a flat name, unique across the groups: its
``COMFY_EMBED_<FLAT NAME>`` variable, and the keyword that sets it
(``Settings(max_queue=5)``, ``settings.replace(webhook_max_attempts=3)``);
:meth:`Settings.flat_fields` maps each to its group and field. Numbers are
checked beyond their types in one table (:data:`_RULES`, by flat name), and
a bad value raises :class:`SettingsError` naming its variable, so a
misconfigured instance stops at start-up instead of failing on a request.
Keyword construction (``Settings(base_dir=...)``) reads no environment; only
:meth:`Settings.from_env` does, once, through :class:`EnvironmentSource`.

Text in the environment: lists are comma- (or semicolon-) separated; an
empty value means none for a setting that may be none, ``""`` for text,
an empty list, false for a switch, and is an error for a number or a
required path; ``none`` or ``off`` is none for an optional number.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import functools
import math
import os
import pkgutil
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

__all__ = [
    "Settings", "SettingsError", "PROJECT_ROOT", "storage_backends", "webhook_secret_key",
    "ComfySettings", "JobSettings", "ServerSettings", "InputSettings", "StorageSettings",
    "WebhookSettings", "ModelSettings", "ObserveSettings", "TaskLogSettings", "SafetySettings",
    "EnvironmentSource",
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_MB = 1024 * 1024
_PREFIX = "COMFY_EMBED_"
#: Variables read, in order, when a setting's own ``COMFY_EMBED_`` one is absent.
_FALLBACKS: dict[str, tuple[str, ...]] = {"port": ("FC_SERVER_PORT",)}


class SettingsError(ValueError):
    """A setting has a bad value; the message names its ``COMFY_EMBED_`` variable."""


#: Modules of the storage package that are not backends.
_NOT_BACKENDS = frozenset({"base", "credentials"})
_WEBHOOK_SECRET_PREFIX = "whsec_"


def storage_backends(folders: Iterable[str] | None = None) -> tuple[str, ...]:
    """The storage backends: the public modules of ``comfy_embed/storage/``
    (or of ``folders``) but its interface and credentials. Listed, not
    imported, so this module imports nothing of the package."""
    folders = [str(Path(__file__).resolve().parent / "storage")] if folders is None else folders
    return tuple(sorted(m.name for m in pkgutil.iter_modules(list(folders))
                        if not m.name.startswith("_") and m.name not in _NOT_BACKENDS))


def webhook_secret_key(secret: str) -> bytes:
    """The HMAC key of ``COMFY_EMBED_WEBHOOK_SECRET``: ``whsec_<base64>`` is
    decoded as Standard Webhooks libraries do; any other value is its UTF-8
    bytes. Raises ValueError for an empty secret or bad base64."""
    if secret.startswith(_WEBHOOK_SECRET_PREFIX):
        try:
            key = base64.b64decode(secret[len(_WEBHOOK_SECRET_PREFIX):], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a whsec_ secret must be whsec_ followed by base64") from None
    else:
        key = secret.encode()
    if not key:
        raise ValueError("the webhook secret is empty")
    return key


_Rule = tuple[Callable[[Any], bool], str]


def _number(low: float, high: float = math.inf, closed: bool = True) -> _Rule:
    """A number in [low, high] (or (low, high] when not ``closed``)."""
    text = f"a number {'>=' if closed else '>'} {low:g}" + (
        f" and <= {high:g}" if high != math.inf else "")
    return (lambda v: (v >= low if closed else v > low) and v <= high), text


def _one_of(*choices: str) -> _Rule:
    return (lambda v: v in choices), ", ".join(choices[:-1]) + " or " + choices[-1]


def _http_url(value: str) -> bool:
    try:
        return httpx.URL(value).scheme in ("http", "https")
    except (httpx.InvalidURL, ValueError):
        return False


def _webhook_secret(value: str) -> bool:
    try:
        webhook_secret_key(value)
    except ValueError:
        return False
    return True


#: Every check of a value beyond its type, in one table: flat name -> (test,
#: what is allowed). None, where a field allows it, always passes: it means
#: "not set". Values that are false (an empty URL) skip the URL and secret checks.
_RULES: dict[str, _Rule] = {
    "max_queue": _number(1), "run_timeout": _number(0, closed=False), "port": _number(1, 65535),
    "max_body_bytes": _number(1), "lease_seconds": _number(0, closed=False),
    # Zero would write keep-alive comments in a tight loop.
    "sse_keepalive": _number(0, closed=False),
    "max_image_bytes": _number(1), "max_image_pixels": _number(1),
    "fetch_timeout": _number(0, closed=False), "max_redirects": _number(0, 100),
    "oss_link_expire": _number(1), "s3_link_expire": _number(1),
    "device": _one_of("auto", "cuda", "cpu"),
    "cache": ((lambda v: v in ("classic", "none") or (v.startswith("lru:") and v[4:].isdigit())),
              "classic, none or lru:<N>"),
    "preview": _one_of("none", "latent2rgb"),
    "storage": ((lambda v: v in storage_backends()), " or ".join(storage_backends())),
    "log_format": _one_of("text", "json"),
    "max_rss_bytes": ((lambda v: v > 0), "a positive number of bytes"),
    "max_vram_bytes": ((lambda v: v > 0), "a positive number of bytes"),
    "oom_recycle_after": ((lambda v: v >= 0), "0 or more"),
    "gc_interval": ((lambda v: v >= 0), "0 or more seconds"),
    "heap_keep_bytes": ((lambda v: 0 <= v < 2**31), "0 to 2147483647 bytes"),
    "max_media_seconds": ((lambda v: v > 0), "a positive number"),
    "model_lock_seconds": ((lambda v: v >= 1), "at least 1"),
    "model_fetch_timeout": ((lambda v: v > 0), "a positive number"),
    "models_fetch": _one_of("startup", "first_use"),
    "task_log_flush_seconds": ((lambda v: 0 <= v <= 60), "0 to 60"),
    "task_log_inline_seconds": ((lambda v: 0 <= v <= 0.1), "0 to 0.1"),
    "progress_interval": ((lambda v: 0 <= v <= 60), "0 to 60"),
    "max_task_events": ((lambda v: 10 <= v <= 10_000_000), "10 to 10000000"),
    "max_nodes": ((lambda v: v >= 1), "at least 1"),
    "max_json_depth": ((lambda v: 8 <= v <= 500), "8-500"),
    "drain_seconds": ((lambda v: v >= 0), "0 or more seconds"),
    "admin_key": ((lambda v: not v or len(v) >= 16), "at least 16 characters"),
    "retention_hours": ((lambda v: v >= 0), "hours >= 0, or none"),
    "webhook_url": ((lambda v: not v or _http_url(v)), "an http(s) URL"),
    "webhook_secret": ((lambda v: _webhook_secret(v)),
                       "any text, or whsec_ followed by base64 (not empty)"),
    "webhook_max_attempts": ((lambda v: v >= 1), "a positive number"),
    "webhook_max_age": ((lambda v: v > 0), "a positive number"),
    "webhook_backoff": ((lambda v: v > 0), "a positive number"),
    "webhook_backoff_max": ((lambda v: v > 0), "a positive number"),
    "webhook_timeout": ((lambda v: v > 0), "a positive number"),
    "webhook_progress_interval": ((lambda v: v >= 0), "0 or more"),
}


class _Group(BaseModel):
    """One concern's settings. A field's flat name (its variable, its keyword
    on Settings) is its alias where it has one, else its own name."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False,
                              validate_default=False, validate_by_name=True,
                              validate_by_alias=True)

    @model_validator(mode="after")
    def _check(self) -> _Group:
        # Fail at start-up, naming the variable, not at the first request.
        for name, field in type(self).model_fields.items():
            flat, value = _flat_name(name, field), getattr(self, name)
            ok, allowed = _RULES.get(flat, (None, ""))
            if ok is not None and value is not None and not ok(value):
                raise SettingsError(f"{_PREFIX}{flat.upper()}={value!r}: expected {allowed}")
        return self


class ComfySettings(_Group):
    """ComfyUI, its folders and how it runs."""

    comfyui_dir: Path = PROJECT_ROOT / "vendor" / "ComfyUI"
    #: Root for models/input/output/temp unless each is set (default: ./data).
    base_dir: Path = PROJECT_ROOT / "data"
    models_dir: Path | None = None
    input_dir: Path | None = None
    output_dir: Path | None = None
    temp_dir: Path | None = None
    extra_model_paths: tuple[Path, ...] = ()
    cache_dir: Path = Path(os.path.expanduser("~/.cache/comfy-embed"))
    #: "auto" (cuda when available), "cuda" or "cpu".
    device: str = "auto"
    #: "classic", "lru:<N>" or "none".
    cache: str = "classic"
    custom_nodes: bool = False
    #: Extra custom_nodes folders (besides <comfyui_dir>/custom_nodes), loaded
    #: when ``custom_nodes`` is on.
    custom_nodes_dirs: tuple[Path, ...] = ()
    #: Checkpoint names (in models/checkpoints) loaded at start-up.
    preload: tuple[str, ...] = ()
    #: PNG outputs embed the workflow as native ComfyUI does.
    write_metadata: bool = True
    #: "none" or "latent2rgb": per-step preview images in progress events.
    preview: str = "none"
    #: Build the tiny random-weights checkpoint when no checkpoint exists.
    tiny_checkpoint: bool = False
    #: Defer importing modules an SD1.5 run never uses (torchvision, scipy.stats,
    #: kornia, av, spandrel) until a node uses them: a faster cold start.
    #: Not applied with ``custom_nodes`` on (packs import them their own ways).
    lazy_imports: bool = True
    #: Seconds between ComfyUI ``progress_state`` messages (each lists every
    #: node); the last one before the end of a run is always sent.
    progress_interval: float = 0.5

    @property
    def models_path(self) -> Path:
        return (self.models_dir or self.base_dir / "models").resolve()

    @property
    def input_path(self) -> Path:
        return (self.input_dir or self.base_dir / "input").resolve()

    @property
    def output_path(self) -> Path:
        return (self.output_dir or self.base_dir / "output").resolve()

    @property
    def temp_path(self) -> Path:
        return (self.temp_dir or self.base_dir / "temp").resolve()


class JobSettings(_Group):
    """The job queue."""

    max_queue: int = 64
    run_timeout: float | None = None
    #: A workflow run before /ready.
    warmup_workflow: Path | None = None


class ServerSettings(_Group):
    """The HTTP server."""

    host: str = "0.0.0.0"
    port: int = 9000
    max_body_bytes: int = 32 * _MB
    #: Run X-Fc-Invocation-Type: Async calls inline (platform queues them).
    async_inline: bool = False
    #: Seconds of silence before an SSE keep-alive comment (proxies close idle streams).
    sse_keepalive: float = 15.0
    #: Seconds that SIGTERM/SIGINT (and /pre-stop) give running work to finish
    #: before it is cancelled and closed with a final event.
    drain_seconds: float = 30.0


class InputSettings(_Group):
    """Image, audio and video inputs, and the URLs they are read from."""

    max_image_bytes: int = 50 * _MB
    max_image_pixels: int = 64_000_000
    #: Longest audio or video input accepted, in seconds.
    max_media_seconds: float = 600.0
    fetch_timeout: float = 20.0
    max_redirects: int = 5
    #: Hosts / CIDRs that URL inputs may reach even if private or loopback.
    url_allowlist: tuple[str, ...] = ()


class StorageSettings(_Group):
    """Object storage: where ``output_oss`` uploads, and ``oss://``/``s3://`` inputs."""

    #: The backend that ``output_oss`` uploads to: a module of comfy_embed/storage/ ("oss", "s3").
    backend: str = Field(default="oss", alias="storage")
    oss_bucket: str | None = None
    oss_region: str | None = None
    oss_endpoint: str | None = None
    oss_public_endpoint: str | None = None
    oss_prefix: str = "serverless-api-output"
    oss_link_expire: int | None = None
    #: Use V4 signing (oss2.ProviderAuthV4); V1 when False.
    oss_sign_v4: bool = True
    #: OSS endpoints (hosts) that ``oss://`` inputs may name.
    oss_endpoint_allowlist: tuple[str, ...] = ()
    #: S3-compatible storage (AWS, R2, MinIO) through boto3: ``pip install comfy-embed[s3]``.
    s3_bucket: str | None = None
    s3_region: str | None = None
    #: Endpoint URL for R2/MinIO (``https://host[:port]``); None: AWS's own.
    s3_endpoint: str | None = None
    s3_prefix: str = "serverless-api-output"
    #: Presigned GET link lifetime in seconds (at most 7 days); None: upload only.
    s3_link_expire: int | None = None
    #: Endpoint hosts other than the configured one that S3 reads may use.
    s3_endpoint_allowlist: tuple[str, ...] = ()


class WebhookSettings(_Group):
    """Webhooks (issue 12): the default one, signing, retries."""

    #: Default webhook for runs that name none (``?webhook=`` wins).
    url: str | None = Field(default=None, alias="webhook_url")
    #: Signing key: ``whsec_<base64>`` (Standard Webhooks form) or any other
    #: string, used as its UTF-8 bytes. None: deliveries are not signed.
    secret: str | None = Field(default=None, alias="webhook_secret")
    #: Attempts per delivery, and seconds after the first attempt to keep trying.
    max_attempts: int = Field(default=8, alias="webhook_max_attempts")
    max_age: float = Field(default=86400.0, alias="webhook_max_age")
    #: Backoff: the n-th retry waits base * 2**(n-1) seconds, jittered down to
    #: half of it, at most ``backoff_max`` (``Retry-After`` may ask more).
    backoff: float = Field(default=5.0, alias="webhook_backoff")
    backoff_max: float = Field(default=3600.0, alias="webhook_backoff_max")
    #: Seconds one delivery attempt may take (connect, send, answer).
    timeout: float = Field(default=10.0, alias="webhook_timeout")
    #: At most one progress webhook per task per this many seconds.
    progress_interval: float = Field(default=2.0, alias="webhook_progress_interval")


class ModelSettings(_Group):
    """The models manifest: models fetched by URL into the models folder."""

    #: A JSON file listing models to fetch: ``[{"url", "sha256", "folder", "name"}]``.
    manifest: Path | None = Field(default=None, alias="models_manifest")
    #: Hosts that manifest URLs may name (exact, or ``*.example.com``); empty:
    #: any public host. Loopback/private hosts also need ``url_allowlist``.
    hosts: tuple[str, ...] = Field(default=(), alias="model_hosts")
    #: Seconds after which another instance takes over a download whose
    #: downloader stopped renewing its lock (crashed).
    lock_seconds: float = Field(default=30.0, alias="model_lock_seconds")
    #: Seconds a manifest download may take.
    fetch_timeout: float = Field(default=3600.0, alias="model_fetch_timeout")
    #: "startup": fetch every manifest model before /ready; "first_use": when
    #: a submitted workflow first names it (the request waits).
    fetch: str = Field(default="startup", alias="models_fetch")


class ObserveSettings(_Group):
    """Observability: the task report, logs, the memory guard."""

    #: Put the per-task report (timings, models, peak memory) in the final
    #: event's ``data.report``.
    task_report: bool = True
    #: "text" or "json" (one object per line on stdout, with task_id).
    log_format: str = "text"
    #: Memory guard: above these (bytes, after a job and a gc) the instance
    #: drains and exits with status 75 to be replaced. None: no watermark.
    max_rss_bytes: int | None = None
    max_vram_bytes: int | None = None
    #: CUDA out-of-memory errors in a row that recycle the instance (0: never).
    oom_recycle_after: int = 3
    #: Seconds between gc + freeing cached memory after jobs (native: 10).
    gc_interval: float = 10.0
    #: Freed memory glibc keeps in its heaps for the next job instead of
    #: giving it back to the OS at once (each job then page-faults its image
    #: buffers afresh). 0: glibc's defaults.
    heap_keep_bytes: int = 512 * 2**20


class TaskLogSettings(_Group):
    """The task log: where tasks' events live, their leases, retention, write pace."""

    #: Folder of per-task event logs (default <output>/serverless_api).
    dir: Path | None = Field(default=None, alias="task_log_dir")
    #: Seconds after which a task whose owner stopped renewing is orphaned.
    lease_seconds: float = 30.0
    #: Hours after which the outputs, inputs and logs of finished tasks (only
    #: what the service recorded), and old temp files, are deleted
    #: (``0`` or ``none``: keep everything).
    retention_hours: float | None = 24.0
    #: Seconds between writes of a running task's events to the task log (one
    #: file per write); the final event is written at once.
    flush_seconds: float = Field(default=0.5, alias="task_log_flush_seconds")
    #: A task's claim and log writes run on the event loop while each takes
    #: less than this (seconds), else in a worker thread; 0: always a thread.
    inline_seconds: float = Field(default=0.003, alias="task_log_inline_seconds")
    #: Events kept per task; past it only terminal events (and the last
    #: progress) are kept.
    max_events: int = Field(default=10_000, alias="max_task_events")


class SafetySettings(_Group):
    """Safety (issue 9): bounds on one request, the node denylist, keys."""

    #: Most nodes one workflow may have.
    max_nodes: int = 400
    #: Deepest nesting of JSON arrays/objects in a request body.
    max_json_depth: int = 64
    #: Node classes refused at validation (they write model files or read
    #: whole folders, other callers' inputs included). Empty string: none.
    node_denylist: tuple[str, ...] = (
        "CheckpointSave", "CLIPSave", "VAESave", "ModelSave", "ImageOnlyCheckpointSave",
        "LoraSave", "SaveLoRANode", "TrainLoraNode", "LoadImageSetFromFolderNode",
        "LoadImageTextSetFromFolderNode", "LoadImageOutput")
    #: API keys (comma-separated); when set, every endpoint but /health needs
    #: one as ``Authorization: Bearer <key>`` or ``X-Api-Key: <key>``.
    api_keys: tuple[str, ...] = ()
    #: Operator key for the lifecycle hooks, as ``X-Admin-Key`` (api/hooks.py).
    admin_key: str | None = None


class Settings(BaseSettings):
    """Everything configurable, one model per concern; see README for the
    COMFY_EMBED_* names.

    A field added to a group is read from ``COMFY_EMBED_<FLAT NAME>``, set by
    its flat keyword and type-checked with no more code.
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

    @property
    def task_log_path(self) -> Path:
        """The task log folder: ``COMFY_EMBED_TASK_LOG_DIR``, else <output>/serverless_api."""
        return (self.tasklog.dir or self.comfy.output_path / "serverless_api").resolve()

    @classmethod
    def flat_fields(cls) -> Mapping[str, tuple[str, str]]:
        """Every flat name (the ``COMFY_EMBED_<NAME>`` variable, lower-case, and
        the keyword) -> (group, field): ``"webhook_max_attempts"`` ->
        ``("webhooks", "max_attempts")``."""
        return types.MappingProxyType(_flat_fields(cls))

    # --- pydantic hooks ----------------------------------------------------------
    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise SettingsError(_describe(type(self), e)) from None

    @model_validator(mode="before")
    @classmethod
    def _route(cls, data: Any) -> Any:
        """Flat names into their groups: ``max_queue=5`` -> ``jobs={"max_queue": 5}``.
        A flat name wins over its field in a group given whole in the same call."""
        if not isinstance(data, dict):
            return data
        fields = _flat_fields(cls)
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
        # Keyword arguments only: the environment is read once, by from_env.
        return (init_settings,)

    def replace(self, **changes: object) -> Settings:
        """A copy with some settings changed, by flat name (``max_queue=3``) or
        whole group (``jobs=...``); the changed groups are checked again."""
        return type(self)(**{**{group: getattr(self, group) for group in type(self).model_fields},
                             **changes})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read ``COMFY_EMBED_<FLAT NAME>`` (upper-case) for every setting, from
        ``env`` (default: ``os.environ``).

        ``FC_SERVER_PORT`` (Function Compute) sets the port when
        ``COMFY_EMBED_PORT`` is absent. Keyword overrides win over both.
        Raises SettingsError naming the variable of a bad value.
        """
        sources = (InitSettingsSource(cls, init_kwargs=overrides),
                   EnvironmentSource(cls, os.environ if env is None else env))
        return cls(_build_sources=(sources, overrides))


@functools.cache
def _flat_fields(settings_cls: type[BaseSettings]) -> dict[str, tuple[str, str]]:
    """Flat name -> (group, field), read off the group models."""
    fields: dict[str, tuple[str, str]] = {}
    for group, name, flat, _ in _group_fields(settings_cls):
        if flat in fields or flat in settings_cls.model_fields:  # a keyword must mean one thing
            raise TypeError(f"two settings are named {flat!r}: {group}.{name} and "
                            f"{fields.get(flat, flat)}")
        fields[flat] = (group, name)
    return fields


def _group_fields(settings_cls: type[BaseSettings]) -> Iterable[tuple[str, str, str, FieldInfo]]:
    """(group, field, flat name, field info) for every field of every group."""
    for group, holder in settings_cls.model_fields.items():
        for name, field in typing.cast("type[BaseModel]", holder.annotation).model_fields.items():
            yield group, name, _flat_name(name, field), field


def _flat_name(name: str, field: FieldInfo) -> str:
    return field.alias or name


class EnvironmentSource(PydanticBaseSettingsSource):
    """The settings set in an environment mapping: each ``COMFY_EMBED_<FLAT NAME>``
    present, in the text forms of this module's docstring, as one dict per group."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.env = env

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """The text set for the flat name ``field_name``, and the variable it came from."""
        var = _PREFIX + field_name.upper()
        if var not in self.env:
            var = next((v for v in _FALLBACKS.get(field_name, ()) if v in self.env), var)
        return self.env.get(var), var, False

    def prepare_field_value(self, field_name: str, field: FieldInfo, value: Any,
                            value_is_complex: bool) -> Any:
        return _from_text(field.annotation, value)

    def __call__(self) -> dict[str, Any]:
        groups: dict[str, dict[str, object]] = {}
        for group, _, flat, field in _group_fields(self.settings_cls):
            raw, var, _ = self.get_field_value(field, flat)
            if raw is None:
                continue
            try:
                value = self.prepare_field_value(flat, field, raw, False)
            except ValueError as e:
                raise SettingsError(f"{var}={raw!r}: {e}") from None
            groups.setdefault(group, {})[flat] = value
        return groups


def _from_text(annotation: Any, raw: str) -> object:
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


def _describe(settings_cls: type[BaseSettings], error: ValidationError) -> str:
    """One line per bad setting, each naming its variable."""
    fields = _flat_fields(settings_cls)
    flat_of = {where: flat for flat, where in fields.items()}
    lines = []
    for item in error.errors():
        loc = tuple(str(part) for part in item["loc"])
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, SettingsError):  # a check of _RULES: it names the variable
            lines.append(str(cause))
        elif item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc[-1], [*fields, *settings_cls.model_fields], n=1)
            lines.append(f"unknown setting {'.'.join(loc)!r}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
        elif len(loc) > 1:  # a group's field, by flat name (or by its name in a group given whole)
            flat = loc[1] if loc[1] in fields else flat_of.get((loc[0], loc[1]), loc[1])
            lines.append(f"{_PREFIX}{flat.upper()}={item.get('input')!r}: {item['msg']}")
        else:
            lines.append(f"{'.'.join(loc) or 'settings'}={item.get('input')!r}: {item['msg']}")
    return "; ".join(lines)
