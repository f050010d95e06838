"""Settings: typed and bounded, read from COMFY_EMBED_* once, and a bad
value stops start-up with an error that names the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_embed.config import (
    JobSettings,
    ServerSettings,
    Settings,
    SettingsError,
    WebhookSettings,
    places,
)
from comfy_embed.config.rules import RULES

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("var, raw, needle", [
    ("COMFY_EMBED_MAX_QUEUE", "", "empty; expected an integer"),
    ("COMFY_EMBED_MAX_QUEUE", "-5", "expected a number >= 1"),
    ("COMFY_EMBED_MAX_QUEUE", "0", "expected a number >= 1"),
    ("COMFY_EMBED_MAX_QUEUE", "lots", "valid integer"),
    ("COMFY_EMBED_PORT", "", "empty; expected an integer"),
    ("COMFY_EMBED_PORT", "70000", "<= 65535"),
    ("FC_SERVER_PORT", "http", "valid integer"),
    ("COMFY_EMBED_LEASE_SECONDS", "", "empty; expected a number"),
    ("COMFY_EMBED_LEASE_SECONDS", "0", "expected a number > 0"),
    ("COMFY_EMBED_SSE_KEEPALIVE", "0", "expected a number > 0"),
    ("COMFY_EMBED_RUN_TIMEOUT", "nan", "finite number"),
    ("COMFY_EMBED_RUN_TIMEOUT", "-1", "> 0"),
    ("COMFY_EMBED_FETCH_TIMEOUT", "0", "> 0"),
    ("COMFY_EMBED_MAX_BODY_BYTES", "1.5", "valid integer"),
    ("COMFY_EMBED_CUSTOM_NODES", "maybe", "valid boolean"),
    ("COMFY_EMBED_DEVICE", "tpu", "expected auto, cuda or cpu"),
    ("COMFY_EMBED_CACHE", "lru", "classic, none or lru:<N>"),
    ("COMFY_EMBED_STORAGE", "gcs", "expected oss or s3"),
    ("COMFY_EMBED_BASE_DIR", "", "empty; expected a path"),
    # Checks of other features (webhooks) are in the same table and name the variable.
    ("COMFY_EMBED_WEBHOOK_MAX_ATTEMPTS", "0", "expected a positive number"),
])
def test_bad_value_names_the_variable(var: str, raw: str, needle: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({var: raw})
    assert str(info.value).startswith(var.replace("FC_SERVER", "COMFY_EMBED") + "=")
    assert needle in str(info.value)


def test_defaults_and_text_forms() -> None:
    assert Settings.from_env({}) == Settings()
    s = Settings.from_env({
        "COMFY_EMBED_URL_ALLOWLIST": " a.example, 10.0.0.0/8;b.example ,",
        "COMFY_EMBED_EXTRA_MODEL_PATHS": "/x/a.yaml,/x/b.yaml",
        "COMFY_EMBED_MAX_QUEUE": " 7 ",
        "COMFY_EMBED_CUSTOM_NODES": "TRUE", "COMFY_EMBED_ASYNC_INLINE": "yes",
        "COMFY_EMBED_WRITE_METADATA": "",           # empty switch: false
        "COMFY_EMBED_RUN_TIMEOUT": "",              # empty optional: none
        "COMFY_EMBED_OSS_LINK_EXPIRE": "none",
        "COMFY_EMBED_OSS_PREFIX": "",               # empty text stays empty
        "COMFY_EMBED_OSS_ENDPOINT_ALLOWLIST": "",   # empty list
        "COMFY_EMBED_BASE_DIR": "/srv/data",
    })
    assert s.inputs.url_allowlist == ("a.example", "10.0.0.0/8", "b.example")
    assert s.comfy.extra_model_paths == (Path("/x/a.yaml"), Path("/x/b.yaml"))
    assert s.jobs.max_queue == 7 and s.comfy.custom_nodes and s.server.async_inline
    assert not s.comfy.write_metadata
    assert s.jobs.run_timeout is None and s.store.oss_link_expire is None
    assert s.store.oss_prefix == "" and s.store.oss_endpoint_allowlist == ()
    assert s.comfy.base_dir == Path("/srv/data") and s.comfy.input_path == Path("/srv/data/input")


def test_port_from_function_compute() -> None:
    assert Settings.from_env({"FC_SERVER_PORT": "9100"}).server.port == 9100
    both = {"FC_SERVER_PORT": "9100", "COMFY_EMBED_PORT": "9200"}
    assert Settings.from_env(both).server.port == 9200
    assert Settings.from_env({"FC_SERVER_PORT": "9100"}, port=9300).server.port == 9300


def test_keywords_over_environment_over_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings built in code merge with COMFY_EMBED_* field by field: a
    keyword wins over its variable, which wins over the default."""
    monkeypatch.setenv("COMFY_EMBED_MAX_QUEUE", "3")
    monkeypatch.setenv("COMFY_EMBED_COMFYUI_DIR", "/opt/ComfyUI")
    monkeypatch.setenv("COMFY_EMBED_WEBHOOK_TIMEOUT", "7")
    monkeypatch.setenv("COMFY_EMBED_STORAGE", "s3")
    s = Settings(base_dir="/tmp/b")  # type: ignore[arg-type]
    assert (s.comfy.base_dir, s.comfy.comfyui_dir) == (Path("/tmp/b"), Path("/opt/ComfyUI"))
    assert s.jobs.max_queue == 3 and s.server.port == 9000  # variable, then default
    assert Settings(max_queue=5).jobs.max_queue == 5
    assert Settings() == Settings.from_env() == Settings.from_env(os.environ)
    # A group given whole sets only the fields it names; the rest still come
    # from the environment (a model's unset fields, a dict by field name or alias).
    whole = Settings(webhooks=WebhookSettings(max_attempts=2), store={"backend": "oss"},
                     jobs={"run_timeout": 4})
    assert (whole.webhooks.max_attempts, whole.webhooks.timeout) == (2, 7.0)
    assert whole.store.backend == "oss" and (whole.jobs.max_queue, whole.jobs.run_timeout) == (3, 4)
    assert Settings.from_env(os.environ, jobs=JobSettings(run_timeout=1)).jobs.max_queue == 3
    # replace() copies: it reads no environment again.
    monkeypatch.setenv("COMFY_EMBED_MAX_QUEUE", "9")
    monkeypatch.setenv("COMFY_EMBED_DEVICE", "cpu")
    r = s.replace(port=8001)
    assert (r.jobs.max_queue, r.comfy.device, r.server.port) == (3, "auto", 8001)
    # A bad variable is named, whatever other keywords came with it; one that
    # a keyword replaces is not read at all.
    monkeypatch.setenv("COMFY_EMBED_LEASE_SECONDS", "0")
    monkeypatch.setenv("COMFY_EMBED_PORT", "")
    with pytest.raises(SettingsError, match="COMFY_EMBED_LEASE_SECONDS=0.0: expected a number > 0"):
        Settings(base_dir="/tmp/b", port=1)  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match="COMFY_EMBED_PORT='': empty"):
        Settings(lease_seconds=5)
    assert Settings(lease_seconds=5, port=1).tasklog.lease_seconds == 5
    assert Settings(tasklog={"lease_seconds": 5}, server=ServerSettings(port=2)).server.port == 2
    assert Settings.from_env(os.environ, lease_seconds=5, port=1).server.port == 1


def test_settings_from_a_mapping_ignore_the_process_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMFY_EMBED_MAX_QUEUE", "3")
    assert Settings.from_env({}).jobs.max_queue == 64
    assert Settings.from_env({"COMFY_EMBED_MAX_QUEUE": "4"}, base_dir="/b").jobs.max_queue == 4


def test_the_tests_start_from_no_setting_variable() -> None:
    """tests/conftest.py drops COMFY_EMBED_<setting> (CI's or a shell's) from
    this process, so Settings(...) in tests mean the same everywhere; other
    COMFY_EMBED_ variables (COMFY_EMBED_TEST_BROWSER) are not settings."""
    flat = Settings.flat_fields()
    assert not [v for v in os.environ if v.startswith("COMFY_EMBED_") and v[12:].lower() in flat]
    assert "test_browser" not in flat and "skip_setup" not in flat


def test_frozen_replace_checks_and_unknown_names() -> None:
    s = Settings(max_queue=5)
    with pytest.raises(ValueError):
        s.jobs.max_queue = 6  # type: ignore[misc]
    with pytest.raises(ValueError):
        s.jobs = JobSettings()  # type: ignore[misc]
    r = s.replace(port=8001)
    assert (r.server.port, r.jobs.max_queue, s.server.port) == (8001, 5, 9000)
    assert r == Settings(max_queue=5, port=8001) and hash(r) == hash(Settings(max_queue=5, port=8001))
    with pytest.raises(SettingsError, match="COMFY_EMBED_MAX_QUEUE=-1: expected a number >= 1"):
        s.replace(max_queue=-1)
    with pytest.raises(SettingsError, match="unknown setting 'max_qeueu'"):
        Settings(max_qeueu=1)  # type: ignore[call-arg]


def test_every_field_is_read_from_its_variable() -> None:
    """A field added to any group is read and type-checked with no more
    code: set each to a non-default value through its flat variable."""
    for name, (group, field_name) in Settings.flat_fields().items():
        group_model = Settings.model_fields[group].annotation
        assert isinstance(group_model, type)
        default = group_model.model_fields[field_name].default
        if default is None:
            continue  # none has no other value to try
        if isinstance(default, bool):
            raw = "0" if default else "1"
        elif isinstance(default, (int, float)):
            raw = str(default * 2 or 1)  # within any sensible bound
        elif isinstance(default, (str, Path)):
            raw = "/elsewhere"
        elif isinstance(default, tuple):
            raw = "a,b"
        else:
            continue
        var = f"COMFY_EMBED_{name.upper()}"
        try:
            s = Settings.from_env({var: raw})
        except SettingsError as e:  # read, and refused by the field's own check
            assert str(e).startswith(var + "="), (name, str(e))
            continue
        assert getattr(getattr(s, group), field_name) != default, name


def test_grouped_access_and_derived_paths() -> None:
    s = Settings.from_env({"COMFY_EMBED_WEBHOOK_MAX_ATTEMPTS": "3", "COMFY_EMBED_STORAGE": "s3",
                           "COMFY_EMBED_OSS_BUCKET": "b", "COMFY_EMBED_MAX_TASK_EVENTS": "50",
                           "COMFY_EMBED_TASK_LOG_DIR": "/logs", "COMFY_EMBED_BASE_DIR": "/d"})
    assert s.webhooks.max_attempts == 3 and s.webhooks.backoff == 5.0
    assert s.store.backend == "s3" and s.store.oss_bucket == "b"
    assert s.tasklog.max_events == 50 and s.tasklog.dir == Path("/logs")
    assert s.comfy.models_path == Path("/d/models") and s.task_log_path == Path("/logs")
    assert Settings(base_dir="/d").task_log_path == Path("/d/output/serverless_api")


def test_flat_keywords_route_to_their_groups() -> None:
    """Flat names are the keywords; each lands in its group, and wins over
    the same field of a group given whole in the same call."""
    s = Settings(webhook_max_attempts=2, storage="s3", max_task_events=20, port=8001)
    assert (s.webhooks.max_attempts, s.store.backend, s.tasklog.max_events) == (2, "s3", 20)
    assert s.server.port == 8001 and s.server.host == "0.0.0.0"
    whole = Settings(webhooks=WebhookSettings(timeout=3.0), webhook_max_attempts=4)
    assert (whole.webhooks.timeout, whole.webhooks.max_attempts) == (3.0, 4)
    assert Settings(jobs={"max_queue": 9}).jobs.max_queue == 9
    # Keywords win over the environment, field by field within a group.
    env = {"COMFY_EMBED_WEBHOOK_TIMEOUT": "7", "COMFY_EMBED_WEBHOOK_MAX_ATTEMPTS": "5"}
    mixed = Settings.from_env(env, webhook_max_attempts=6)
    assert (mixed.webhooks.timeout, mixed.webhooks.max_attempts) == (7.0, 6)
    flat = Settings.flat_fields()
    assert flat["webhook_max_attempts"] == ("webhooks", "max_attempts")
    assert flat["storage"] == ("store", "backend") and flat["max_queue"] == ("jobs", "max_queue")
    assert set(RULES) <= set(flat)  # every check names a real setting


def test_replace_changes_one_group_and_checks_it() -> None:
    s = Settings(max_queue=5, webhook_timeout=3.0)
    r = s.replace(webhook_max_attempts=2)
    assert (r.webhooks.max_attempts, r.webhooks.timeout, r.jobs.max_queue) == (2, 3.0, 5)
    assert r.jobs is s.jobs and s.webhooks.max_attempts == 8  # untouched groups are shared
    assert s.replace(jobs=JobSettings(max_queue=7)).jobs.max_queue == 7
    with pytest.raises(SettingsError, match="COMFY_EMBED_WEBHOOK_MAX_ATTEMPTS=0: expected"):
        s.replace(webhook_max_attempts=0)
    with pytest.raises(SettingsError, match="COMFY_EMBED_WEBHOOK_TIMEOUT='soon': .*valid number"):
        s.replace(webhook_timeout="soon")


def test_unknown_names_are_refused_clearly() -> None:
    with pytest.raises(SettingsError, match=r"unknown setting 'webhook_max_attempt' "
                                            r"\(did you mean 'webhook_max_attempts'\?\)"):
        Settings(webhook_max_attempt=3)
    with pytest.raises(SettingsError, match=r"unknown setting 'max_attempts'"):
        Settings(max_attempts=3)  # a group's field name is not a flat name
    with pytest.raises(SettingsError, match=r"unknown setting 'jobs.max_qeue'"):
        Settings(jobs={"max_qeue": 3})
    with pytest.raises(SettingsError, match=r"unknown setting 'colour'"):
        Settings().replace(colour="blue")


def test_server_refuses_to_start_on_a_bad_setting(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "COMFY_EMBED_BASE_DIR": str(tmp_path),
           "COMFY_EMBED_SSE_KEEPALIVE": "0"}
    out = subprocess.run([sys.executable, "server.py"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert "COMFY_EMBED_SSE_KEEPALIVE=0.0: expected a number > 0" in out.stderr
    assert "Traceback" not in out.stderr


def test_default_places_follow_the_checkout() -> None:
    """From this checkout ComfyUI is the submodule at the pinned commit and data
    goes to <checkout>/data; an installed wheel (places.CHECKOUT false) looks in
    the cache folder that `comfy-embed install-comfyui` fills, and in ./data."""
    assert places.CHECKOUT
    assert Settings.from_env({}).comfy.comfyui_dir == ROOT / "vendor" / "ComfyUI"
    assert Settings.from_env({}).comfy.base_dir == ROOT / "data"
    assert places.installed_comfyui(Path("/c")) == Path("/c/ComfyUI")
    pinned = subprocess.run(["git", "ls-tree", "HEAD", "vendor/ComfyUI"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    assert pinned[1:3] == ["commit", places.COMFYUI_COMMIT]


def test_an_installed_wheel_finds_comfyui_in_the_cache_folder(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside a checkout, COMFY_EMBED_CACHE_DIR moves the ComfyUI that
    install-comfyui put there, unless COMFY_EMBED_COMFYUI_DIR names another."""
    monkeypatch.setattr(places, "CHECKOUT", False)
    moved = Settings.from_env({"COMFY_EMBED_CACHE_DIR": "/c"})
    assert moved.comfy.comfyui_dir == Path("/c/ComfyUI")
    named = {"COMFY_EMBED_CACHE_DIR": "/c", "COMFY_EMBED_COMFYUI_DIR": "/opt/ComfyUI"}
    assert Settings.from_env(named).comfy.comfyui_dir == Path("/opt/ComfyUI")
    monkeypatch.setenv("COMFY_EMBED_COMFYUI_DIR", "/opt/ComfyUI")
    assert Settings(cache_dir="/c").comfy.comfyui_dir == Path("/opt/ComfyUI")  # type: ignore[arg-type]
    assert Settings(cache_dir="/c").replace(port=1).comfy.comfyui_dir == Path("/opt/ComfyUI")  # type: ignore[arg-type]
    monkeypatch.setattr(places, "CHECKOUT", True)
    assert Settings.from_env({"COMFY_EMBED_CACHE_DIR": "/c"}).comfy.comfyui_dir == (
        ROOT / "vendor" / "ComfyUI")
