"""Settings: typed and bounded, read from COMFY_EMBED_* once, and a bad
value stops start-up with an error that names the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from comfy_embed.config import Settings, SettingsError

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
    assert s.url_allowlist == ("a.example", "10.0.0.0/8", "b.example")
    assert s.extra_model_paths == (Path("/x/a.yaml"), Path("/x/b.yaml"))
    assert s.max_queue == 7 and s.custom_nodes and s.async_inline and not s.write_metadata
    assert s.run_timeout is None and s.oss_link_expire is None
    assert s.oss_prefix == "" and s.oss_endpoint_allowlist == ()
    assert s.base_dir == Path("/srv/data") and s.input_path == Path("/srv/data/input")


def test_port_from_function_compute() -> None:
    assert Settings.from_env({"FC_SERVER_PORT": "9100"}).port == 9100
    assert Settings.from_env({"FC_SERVER_PORT": "9100", "COMFY_EMBED_PORT": "9200"}).port == 9200
    assert Settings.from_env({"FC_SERVER_PORT": "9100"}, port=9300).port == 9300


def test_keyword_construction_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMFY_EMBED_MAX_QUEUE", "3")
    assert Settings().max_queue == 64
    assert Settings.from_env().max_queue == 3
    s = Settings(base_dir="/tmp/b", max_queue=5)  # type: ignore[arg-type]
    assert s.base_dir == Path("/tmp/b") and s.max_queue == 5


def test_frozen_replace_checks_and_unknown_names() -> None:
    s = Settings(max_queue=5)
    with pytest.raises(ValueError):
        s.max_queue = 6  # type: ignore[misc]
    r = s.replace(port=8001)
    assert (r.port, r.max_queue, s.port) == (8001, 5, 9000)
    assert r == Settings(max_queue=5, port=8001) and hash(r) == hash(Settings(max_queue=5, port=8001))
    with pytest.raises(SettingsError, match="COMFY_EMBED_MAX_QUEUE=-1: expected a number >= 1"):
        s.replace(max_queue=-1)
    with pytest.raises(SettingsError, match="unknown setting 'max_qeueu'"):
        Settings(max_qeueu=1)  # type: ignore[call-arg]


def test_every_field_is_read_from_its_variable() -> None:
    """A field added anywhere in the class is read and type-checked with no
    more code: set each to a non-default value through the environment."""
    for name, field in Settings.model_fields.items():
        default = field.default
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
        assert getattr(s, name) != default, name


def test_server_refuses_to_start_on_a_bad_setting(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "COMFY_EMBED_BASE_DIR": str(tmp_path),
           "COMFY_EMBED_SSE_KEEPALIVE": "0"}
    out = subprocess.run([sys.executable, "server.py"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert "COMFY_EMBED_SSE_KEEPALIVE=0.0: expected a number > 0" in out.stderr
    assert "Traceback" not in out.stderr
