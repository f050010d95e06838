"""One frozen model per concern; Settings (settings.py) composes them."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from comfy_embed.config import places
from comfy_embed.config.places import CACHE_DIR, default_base_dir, default_comfyui_dir
from comfy_embed.config.rules import (
    MB,
    PREFIX,
    RULES,
    SettingsError,
    flat_name,
)


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
            flat, value = flat_name(name, field), getattr(self, name)
            ok, allowed = RULES.get(flat, (None, ""))
            if ok is not None and value is not None and not ok(value):
                raise SettingsError(f"{PREFIX}{flat.upper()}={value!r}: expected {allowed}")
        return self


class ComfySettings(_Group):
    """ComfyUI, its folders and how it runs."""

    #: The checkout's vendor/ComfyUI, or where ``comfy-embed install-comfyui``
    #: puts it for an installed wheel (config/places.py).
    comfyui_dir: Path = default_comfyui_dir()
    #: Root for models/input/output/temp unless each is set (default: ./data).
    base_dir: Path = default_base_dir()
    models_dir: Path | None = None
    input_dir: Path | None = None
    output_dir: Path | None = None
    temp_dir: Path | None = None
    extra_model_paths: tuple[Path, ...] = ()
    cache_dir: Path = CACHE_DIR
    #: "auto" (cuda when available), "cuda" or "cpu".
    device: str = "auto"
    #: "classic", "lru:<N>" or "none".
    cache: str = "classic"
    custom_nodes: bool = False
    #: Load ComfyUI's API (partner) nodes (comfy_api_nodes/: OpenAI, Kling,
    #: ...), which call paid services with the key a request's
    #: ``extra_data.api_key_comfy_org`` carries.
    api_nodes: bool = False
    #: Extra custom_nodes folders (besides <comfyui_dir>/custom_nodes), loaded
    #: when ``custom_nodes`` is on.
    custom_nodes_dirs: tuple[Path, ...] = ()
    #: The lock file (comfy-embed.lock) the instance compares itself with at
    #: boot: packs at other commits or failing, models missing or altered.
    lock: Path | None = None
    #: "report": drift is shown in /ready and each task's report; "unready":
    #: an instance that drifted answers /ready 503.
    lock_drift: str = "report"
    #: Checkpoint names (in models/checkpoints) loaded at start-up.
    preload: tuple[str, ...] = ()
    #: Model file names (as loaders name them, relative to their folder) that
    #: stay loaded between jobs whatever runs between; loaded at start-up
    #: where a loader loads them alone; let go only under memory pressure.
    keep_loaded: tuple[str, ...] = ()
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
    #: Threads that encode output images (SaveImage's, PreviewImage's PNGs,
    #: animated WebP/PNG) off the executor thread, which meanwhile takes the
    #: next job; 0 encodes them on it, as native ComfyUI does.
    encode_workers: int = 2
    #: Images at most waiting for or in encoding; when full, the executor
    #: thread waits for one to finish (bounded memory).
    encode_backlog: int = 8
    #: Encode in worker processes (spawned when first needed): Pillow holds the GIL
    #: while it compresses, so threads would slow the executor's Python.
    encode_processes: bool = True
    #: Hand encoding off even when no job waits for the executor (default:
    #: an idle executor encodes itself, as native does, with no hand-off).
    encode_when_idle: bool = False

    @model_validator(mode="after")
    def _comfyui_in_cache(self) -> ComfySettings:
        # An installed wheel's ComfyUI is where install-comfyui put it: in the
        # cache folder, which COMFY_EMBED_CACHE_DIR moves. Not recorded as set,
        # so a variable still fills it in (Settings merges field by field).
        if not places.CHECKOUT and {"cache_dir", "comfyui_dir"} & self.model_fields_set == {
                "cache_dir"}:
            object.__setattr__(self, "comfyui_dir", places.installed_comfyui(self.cache_dir))
        return self

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
    #: Seconds a running job may go without a progress event (any ComfyUI
    #: message) before it is interrupted and fails as ``stalled``; ignored for
    #: as long again, the instance drains and exits (comfy_embed/watchdog.py).
    #: None: no watchdog.
    stall_seconds: float | None = None
    #: Most variants one request may ask for (``?variants=N``, ``extra_data.variants``).
    max_variants: int = 16
    #: A workflow run before /ready.
    warmup_workflow: Path | None = None
    #: The ETA (comfy_embed/eta.py): runs per workflow shape its median is
    #: taken over; recent reports of the task log read at boot as the prior
    #: (0: none); a shape never seen takes "median" (of the last runs of any
    #: shape) or "none" (no ETA).
    eta_window: int = 20
    eta_history: int = 200
    eta_fallback: str = "median"
    #: Fair share between API keys (issue 28; only with ``api_keys``): one
    #: FIFO per key, served round-robin. False: one FIFO for all, as without keys.
    fair_share: bool = True
    #: Most jobs one API key may have waiting (429 ``key_queue_full`` beyond).
    key_queue: int = 16
    #: Most jobs one API key may have running: executing, or its output files
    #: still being encoded (its next job waits while other keys' run).
    key_running: int = 2
    #: Per-key quotas, ``<key id>=<queue>/<running>`` (comma-separated); the
    #: key id is the first 8+ hex digits of the key's hash (README).
    key_quotas: tuple[str, ...] = ()


class ServerSettings(_Group):
    """The HTTP server."""

    host: str = "0.0.0.0"
    port: int = 9000
    max_body_bytes: int = 32 * MB
    #: Run X-Fc-Invocation-Type: Async calls inline (platform queues them).
    async_inline: bool = False
    #: Seconds of silence before an SSE keep-alive comment (proxies close idle streams).
    sse_keepalive: float = 15.0
    #: Seconds that SIGTERM/SIGINT (and /pre-stop) give running work to finish
    #: before it is cancelled and closed with a final event.
    drain_seconds: float = 30.0


class InputSettings(_Group):
    """Image, audio and video inputs, and the URLs they are read from."""

    max_image_bytes: int = 50 * MB
    max_image_pixels: int = 64_000_000
    #: Longest audio or video input accepted, in seconds.
    max_media_seconds: float = 600.0
    fetch_timeout: float = 20.0
    max_redirects: int = 5
    #: Most URL inputs (http(s), oss://, s3://) one request may name.
    max_url_inputs: int = 16
    #: Most bytes one request's URL and inline inputs may bring, all together.
    max_request_input_bytes: int = 200 * MB
    #: URL inputs fetched at once by an instance, all requests together
    #: (each streams to a file of the input folder, never whole in memory).
    fetch_concurrency: int = 8
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
    #: Most bytes a manifest download may write when its entry gives no ``size``.
    max_bytes: int = Field(default=64 * 1024 * MB, alias="model_max_bytes")
    #: Seconds a first-use download that failed (its sha256, its size, the
    #: network) is answered from memory instead of being downloaded again.
    retry_seconds: float = Field(default=300.0, alias="model_retry_seconds")
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
    #: Runs of one task id at most: a retry of a task whose last attempt was
    #: lost (lease expired, drain past grace, recycle) runs it again until this.
    max_attempts: int = Field(default=3, alias="task_max_attempts")
    #: Redis (``redis://host:port/db``) whose stream queues async runs for
    #: the whole fleet (issue 24); None: each instance queues its own.
    redis_url: str | None = None
    #: The stream's key in Redis.
    queue_stream: str = "comfy-embed:tasks"
    #: Hours after which the outputs, inputs and logs of finished tasks (only
    #: what the service recorded), and old temp files, are deleted
    #: (``0`` or ``none``: keep everything).
    retention_hours: float | None = 24.0
    #: Longest ``?ttl=`` (seconds) a request may ask; None: the retention
    #: period. A request may shorten its retention, never lengthen it.
    max_ttl: float | None = None
    #: "all": keep inputs and outputs for the retention period; "nothing":
    #: delete them once the answer is delivered (or the webhook settled),
    #: keeping only their hashes and sizes in the log (``?keep=`` per request).
    keep: str = "all"
    #: Whether deleting a task (DELETE, ``?ttl=``, keep nothing) also deletes
    #: the objects its results uploaded to object storage.
    delete_objects: bool = False
    #: Seconds between writes of a running task's events to the task log (one
    #: file per write); the final event is written at once.
    flush_seconds: float = Field(default=0.5, alias="task_log_flush_seconds")
    #: Seconds within which a final event written before its answer is
    #: fsynced: the finals of that span share one fsync (one journal commit),
    #: after their answers. 0: each at once, still after its answer.
    sync_seconds: float = Field(default=0.2, alias="task_log_sync_seconds")
    #: A task's claim and log writes run on the event loop while each takes
    #: less than this (seconds), else in a worker thread; 0: always a thread.
    inline_seconds: float = Field(default=0.003, alias="task_log_inline_seconds")
    #: Events kept per task; past it only terminal events (and the last
    #: progress) are kept.
    max_events: int = Field(default=10_000, alias="max_task_events")


class AppsSettings(_Group):
    """Workflow apps: saved workflows called by name with named parameters."""

    #: Folder of apps (``<name>.json`` each; default <base>/apps). Read on
    #: every call, so adding or changing an app needs no restart; put it on
    #: the shared volume and every instance serves the same apps.
    dir: Path | None = Field(default=None, alias="apps_dir")


class V2Settings(_Group):
    """Comfy API v2 (``/api/v2/``): asset uploads and idempotency keys."""

    #: Largest asset upload (the whole multipart body); more is 413.
    asset_max_bytes: int = 100 * MB
    #: How long an ``Idempotency-Key`` answer is replayed.
    idempotency_hours: float = 24.0
    #: Upload v2 jobs' outputs to the configured object storage
    #: (``COMFY_EMBED_STORAGE``); their content is then a 302 to a fresh signed URL.
    v2_outputs_to_storage: bool = False


class SafetySettings(_Group):
    """Safety (issue 9): bounds on one request, the node denylist, keys."""

    #: Most nodes one workflow may have.
    max_nodes: int = 400
    #: Most bytes of output the sizes a workflow states may write, all nodes
    #: together (width x height x batch_size/length/amount x 3, plus the PNG
    #: metadata per picture), estimated at validation.
    max_output_bytes: int = 2 * 1024 * MB
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

