"""The deployment files agree with the server they deploy: ports, hook and
probe paths (the app's own routes), environment (real Settings fields that
validate), mount paths (where Settings puts models and the task log); the
Kubernetes manifests validate offline against the API schemas.

The image itself is proven in real containers by scripts/image-check, and
the queue overlay in real pods by scripts/kube-check (whose renderer is
checked here against ``kubectl kustomize`` where kubectl is installed).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from comfy_embed.api import create_app
from comfy_embed.config import Settings
from comfy_embed.runtime import Engine

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
K8S_VERSION = "1.30.0"
SETTING_NAMES = {name.upper() for name in Settings.flat_fields()}


def dockerfile_env() -> dict[str, str]:
    """The ENV block of the Dockerfile, as a mapping."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def dockerfile_uid() -> int:
    return int(re.search(r"^ARG UID=(\d+)$", (ROOT / "Dockerfile").read_text(), re.M).group(1))


@pytest.fixture(scope="module")
def routes() -> dict[str, set[str]]:
    """path -> HTTP methods of the real app (nothing is started)."""
    settings = Settings(tiny_checkpoint=True, device="cpu")
    app = create_app(settings, Engine(settings))
    return {r.path: set(getattr(r, "methods", None) or {"GET"}) for r in app.routes}


def image_settings(extra: dict[str, str]) -> Settings:
    """Settings as the container sees them: the image's ENV, then ``extra``."""
    env = {**dockerfile_env(), **{k: str(v) for k, v in extra.items()}}
    unknown = {k for k in env if k.startswith("COMFY_EMBED_")} - {
        "COMFY_EMBED_" + n for n in SETTING_NAMES}
    assert not unknown, f"not settings: {unknown}"
    return Settings.from_env(env)


# ----------------------------------------------------------------- the image
def test_dockerfile_serves_fc_port_from_data(routes: dict[str, set[str]]) -> None:
    env = dockerfile_env()
    settings = image_settings({})
    assert env["FC_SERVER_PORT"] == "9000" and settings.server.port == 9000
    assert settings.comfy.base_dir == Path("/data")
    assert settings.comfy.models_path == Path("/data/models")
    assert settings.task_log_path == Path("/data/output/serverless_api")
    assert settings.comfy.comfyui_dir == Path("/app/vendor/ComfyUI")
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^EXPOSE 9000$", text, re.M)
    assert re.search(r"^USER comfy$", text, re.M)
    assert re.search(r'^VOLUME \["/data"\]$', text, re.M)
    health = re.search(r"^HEALTHCHECK .*?(/\w+)'", text.replace("\\\n", " "), re.M)
    assert health and health.group(1) == "/health" and "GET" in routes["/health"]


# ------------------------------------------------------------ Function Compute
@pytest.fixture(scope="module")
def fc() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "deploy" / "fc" / "s.yaml").read_text())
    (resource,) = doc["resources"].values()
    assert resource["component"] == "fc3"
    return resource["props"]


def test_fc_container_port_and_hooks(fc: dict[str, Any], routes: dict[str, set[str]]) -> None:
    assert fc["runtime"] == "custom-container"
    port = fc["customContainerConfig"]["port"]
    # FC passes the configured port as FC_SERVER_PORT; the image defaults to it.
    assert Settings.from_env({"FC_SERVER_PORT": str(port)}).server.port == port
    assert str(port) == dockerfile_env()["FC_SERVER_PORT"]
    hooks = fc["instanceLifecycleConfig"]
    # FC's custom-container hooks: POST /initialize, GET /pre-stop.
    assert hooks["initializer"]["handler"] == "/initialize" and "POST" in routes["/initialize"]
    assert hooks["preStop"]["handler"] == "/pre-stop" and "GET" in routes["/pre-stop"]
    assert "GET" in routes["/pre-freeze"]
    assert "GET" in routes[fc["customContainerConfig"]["healthCheckConfig"]["httpGetUrl"]]


def test_fc_environment_and_nas_agree_with_settings(fc: dict[str, Any]) -> None:
    settings = image_settings(fc["environmentVariables"])
    (mount,) = fc["nasConfig"]["mountPoints"]
    nas = Path(mount["mountDir"])
    assert nas == Path("/mnt/auto/comfy")
    # Models and the shared task log are on the NAS, so every instance sees them.
    folders = settings.comfy
    for path in (folders.models_path, folders.input_path, folders.output_path,
                 settings.task_log_path):
        assert nas in path.parents, path
    assert nas not in folders.temp_path.parents  # scratch stays local
    assert fc["nasConfig"]["userId"] == fc["nasConfig"]["groupId"] == dockerfile_uid()
    # FC queues async calls and may freeze an answered instance: run inline.
    assert settings.server.async_inline is True
    # A run ends (504, with a final event) before FC cuts the invocation off.
    assert settings.jobs.run_timeout is not None and settings.jobs.run_timeout < fc["timeout"]
    assert fc["instanceLifecycleConfig"]["preStop"]["timeout"] >= settings.jobs.run_timeout
    assert fc["asyncInvokeConfig"]["asyncTask"] is True
    assert fc["gpuConfig"]["gpuMemorySize"] > 0 and fc["instanceConcurrency"] >= 1


# ------------------------------------------------------------------ Kubernetes
def k8s_docs(name: str) -> list[dict[str, Any]]:
    """The documents of a manifest in deploy/k8s/base (else deploy/k8s)."""
    path = BASE / name if (BASE / name).exists() else K8S / name
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_kustomization_lists_the_manifests() -> None:
    (kust,) = k8s_docs("kustomization.yaml")
    assert sorted(kust["resources"]) == ["deployment.yaml", "pvc.yaml", "service.yaml"]
    # deploy/k8s applies the base; the queue overlay builds on it beside it.
    (top,) = [d for d in yaml.safe_load_all((K8S / "kustomization.yaml").read_text()) if d]
    assert top["resources"] == ["base"]


@pytest.mark.parametrize("name", ["deployment.yaml", "service.yaml", "pvc.yaml"])
def test_k8s_manifest_validates(name: str) -> None:
    for doc in k8s_docs(name):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_k8s_validation_catches_mistakes() -> None:
    """The validator is not a no-op: a misspelt field fails."""
    (deployment,) = k8s_docs("deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_knative_pod_template_validates() -> None:
    """Knative's Service is a custom resource; its template is a pod spec
    (plus Knative's own containerConcurrency and timeoutSeconds)."""
    (ksvc,) = k8s_docs("knative-service.yaml")
    assert ksvc["apiVersion"] == "serving.knative.dev/v1" and ksvc["kind"] == "Service"
    template = ksvc["spec"]["template"]
    assert template["metadata"]["annotations"]["autoscaling.knative.dev/min-scale"] == "0"
    spec = dict(template["spec"])
    assert spec.pop("containerConcurrency") >= 1 and spec.pop("timeoutSeconds") > 0
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "knative-template"}, "spec": spec}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def _pod_specs() -> list[dict[str, Any]]:
    (deployment,) = k8s_docs("deployment.yaml")
    (ksvc,) = k8s_docs("knative-service.yaml")
    return [deployment["spec"]["template"]["spec"], ksvc["spec"]["template"]["spec"]]


@pytest.mark.parametrize("which", [0, 1], ids=["deployment", "knative"])
def test_k8s_container_agrees_with_server(which: int, routes: dict[str, set[str]]) -> None:
    pod = _pod_specs()[which]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    settings = image_settings(env)
    (port,) = container["ports"]
    assert port["containerPort"] == settings.server.port == 9000
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if probe in container:
            assert "GET" in routes[container[probe]["httpGet"]["path"]]
    (mount,) = container["volumeMounts"]
    assert Path(mount["mountPath"]) == settings.comfy.base_dir
    assert Path(mount["mountPath"]) in settings.task_log_path.parents
    (volume,) = pod["volumes"]
    assert volume["name"] == mount["name"]
    (pvc,) = k8s_docs("pvc.yaml")
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert settings.jobs.run_timeout is not None


def test_k8s_deployment_drains_before_stopping(routes: dict[str, set[str]]) -> None:
    pod = _pod_specs()[0]
    (container,) = pod["containers"]
    # /pre-stop answers direct loopback calls (api/hooks.py), not the
    # kubelet's: the hook runs in the container and calls 127.0.0.1.
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    assert "'http://127.0.0.1:%s/pre-stop'" in command[2] and "GET" in routes["/pre-stop"]
    assert "COMFY_EMBED_PORT" in command[2]
    env = {e["name"]: e["value"] for e in container["env"]}
    # The grace period outlasts a run, so preStop's drain is not cut short.
    assert pod["terminationGracePeriodSeconds"] > float(env["COMFY_EMBED_RUN_TIMEOUT"])
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid()


def test_fc_async_retries_fit_the_attempts(fc: dict[str, Any]) -> None:
    # Issue 24: FC's retries run a lost task again; no more than comfy-embed allows.
    retries = fc["asyncInvokeConfig"]["maxAsyncRetryAttempts"]
    assert 1 <= retries + 1 <= Settings().tasklog.max_attempts


# ------------------------------------------------ the durable queue (issue 24)
QUEUE = K8S / "queue"


def queue_docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((QUEUE / name).read_text()) if d]


def test_queue_overlay_lists_its_manifests_and_the_base() -> None:
    (kust,) = queue_docs("kustomization.yaml")
    assert kust["resources"] == ["../base", "redis.yaml", "scaledobject.yaml"]
    assert [p["path"] for p in kust["patches"]] == ["deployment-queue.yaml"]
    for name in ("redis.yaml", "scaledobject.yaml", "deployment-queue.yaml"):
        assert (QUEUE / name).is_file()


def test_queue_redis_validates() -> None:
    docs = queue_docs("redis.yaml")
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim", "Deployment", "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_queue_settings_keda_and_redis_agree() -> None:
    from comfy_embed.queue.streams import GROUP

    (patch,) = queue_docs("deployment-queue.yaml")
    (deployment,) = k8s_docs("deployment.yaml")
    assert patch["metadata"]["name"] == deployment["metadata"]["name"]
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    settings = Settings.from_env(env)  # real settings: a misspelt name or bad value fails here
    url = settings.tasklog.redis_url
    assert url is not None and url.startswith("redis://")
    _, _, redis_svc = queue_docs("redis.yaml")
    host_port = f"{redis_svc['metadata']['name']}:{redis_svc['spec']['ports'][0]['port']}"
    assert url.split("//")[1].split("/")[0] == host_port

    (scaled,) = queue_docs("scaledobject.yaml")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["kind"] == "ScaledObject"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] >= 1  # to zero when idle
    measures = set()
    for trigger in spec["triggers"]:
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams"
        assert meta["address"] == host_port and meta["consumerGroup"] == GROUP
        assert meta["stream"] == settings.tasklog.queue_stream
        measures |= {"lagCount", "pendingEntriesCount"} & set(meta)
    # Lag wakes it from zero; pending entries keep replicas while they run.
    assert measures == {"lagCount", "pendingEntriesCount"}


# ------------------------------------- scripts/kube-check (issue 24: real pods)
def kube_check() -> Any:
    """scripts/kube-check as a module (its renderer and pod adaptation)."""
    import importlib.machinery
    import importlib.util

    path = ROOT / "scripts" / "kube-check"
    loader = importlib.machinery.SourceFileLoader("kube_check", str(path))
    spec = importlib.util.spec_from_loader("kube_check", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.mark.parametrize("folder", [K8S, QUEUE], ids=["k8s", "queue"])
def test_kube_check_renders_what_kustomize_does(folder: Path) -> None:
    """What scripts/kube-check plays is what ``kubectl apply -k`` applies
    (kustomize itself, bundled with kubectl, where installed)."""
    import shutil
    import subprocess

    docs = kube_check().render(folder)
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    kinds = sorted(key(d) for d in docs)
    expected = [("Deployment", "comfy-embed"), ("PersistentVolumeClaim", "comfy-embed-data"),
                ("Service", "comfy-embed")]
    if folder == QUEUE:
        expected += [("Deployment", "comfy-embed-redis"),
                     ("PersistentVolumeClaim", "comfy-embed-redis"),
                     ("ScaledObject", "comfy-embed"), ("Service", "comfy-embed-redis")]
    assert kinds == sorted(expected)
    (app,) = [d for d in docs if key(d) == ("Deployment", "comfy-embed")]
    env = {e["name"] for e in app["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert ("COMFY_EMBED_REDIS_URL" in env) == (folder == QUEUE)  # the overlay's patch applied
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (kustomize) is not installed: compared with the expected kinds only")
    out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    theirs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted(docs, key=key) == sorted(theirs, key=key)


def test_kube_check_refuses_an_overlay_inside_its_base(tmp_path: Path) -> None:
    """kustomize refuses an overlay inside the folder it builds on (the
    queue overlay once was); so does the renderer, so this test catches it."""
    kc = kube_check()
    (tmp_path / "kustomization.yaml").write_text("resources: [pvc.yaml]\n")
    (tmp_path / "pvc.yaml").write_text((BASE / "pvc.yaml").read_text())
    (tmp_path / "inner").mkdir()
    (tmp_path / "inner" / "kustomization.yaml").write_text("resources: ['../']\n")
    assert len(kc.render(tmp_path)) == 1
    with pytest.raises(kc.CheckFailed, match="cycle"):
        kc.render(tmp_path / "inner")


def test_kube_check_plays_the_manifest_adapted_only_for_this_host() -> None:
    """The pod kube-check plays is the shipped Deployment with only the image,
    replicas, CPU for the GPU, the given settings, host ports and the
    Service's address changed; the result still validates."""
    kc = kube_check()
    (app,) = [d for d in kc.render(QUEUE) if d["kind"] == "Deployment"
              and d["metadata"]["name"] == "comfy-embed"]
    played = kc.for_podman(app, name="comfy-embed-a-x", image="localhost/comfy-embed:check",
                           suffix="x", env={"COMFY_EMBED_DEVICE": "cpu"},
                           host_aliases={"comfy-embed-redis": "10.89.0.2"})
    kubernetes_validate.validate(played, K8S_VERSION, strict=True)
    pod, shipped = played["spec"]["template"]["spec"], app["spec"]["template"]["spec"]
    (c,), (c0,) = pod["containers"], shipped["containers"]
    assert c["image"] == "localhost/comfy-embed:check" and played["spec"]["replicas"] == 1
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    env, env0 = ({e["name"]: e["value"] for e in x["env"]} for x in (c, c0))
    assert env == {**env0, "COMFY_EMBED_DEVICE": "cpu"}
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "comfy-embed-data-x"
    assert pod["hostAliases"] == [{"ip": "10.89.0.2", "hostnames": ["comfy-embed-redis"]}]
    for field in ("securityContext", "terminationGracePeriodSeconds"):
        assert pod[field] == shipped[field]
    for field in ("lifecycle", "readinessProbe", "livenessProbe", "startupProbe",
                  "volumeMounts"):
        assert c[field] == c0[field]
    assert [p["containerPort"] for p in c["ports"]] == [p["containerPort"] for p in c0["ports"]]


# ------------------------------------------------ routing by model (issue 28)
ROUTING = K8S / "routing"
#: The request header deploy/README.md "Routing by model" has clients set.
MODEL_HEADER = "Comfy-Model"


def model_token(name: str) -> str:
    """The header's value for a model, as deploy/README.md says to make it."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64]


def test_routing_overlay_hashes_on_the_model_header() -> None:
    (kust,) = [d for d in yaml.safe_load_all((ROUTING / "kustomization.yaml").read_text()) if d]
    assert kust["resources"] == ["../base", "ingress.yaml"]
    (ingress,) = [d for d in yaml.safe_load_all((ROUTING / "ingress.yaml").read_text()) if d]
    kubernetes_validate.validate(ingress, K8S_VERSION, strict=True)
    notes = ingress["metadata"]["annotations"]
    variable = "$http_" + MODEL_HEADER.lower().replace("-", "_")  # nginx's name for it
    assert notes["nginx.ingress.kubernetes.io/upstream-hash-by"] == variable
    assert f"`{MODEL_HEADER}`" in (ROOT / "deploy" / "README.md").read_text()
    (path,) = ingress["spec"]["rules"][0]["http"]["paths"]
    (service,) = k8s_docs("service.yaml")
    assert path["backend"]["service"]["name"] == service["metadata"]["name"]
    assert path["backend"]["service"]["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    # A sync run answers when it ends: nginx waits longer than a run may take.
    (deployment,) = k8s_docs("deployment.yaml")
    env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    settings = image_settings(env)
    assert settings.jobs.run_timeout is not None
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > settings.jobs.run_timeout
    assert int(notes["nginx.ingress.kubernetes.io/proxy-body-size"].rstrip("m")) * 2**20 >= \
        settings.server.max_body_bytes


def fc_session_affinity() -> dict[str, Any]:
    """The commented ``sessionAffinity`` block of fc/s.yaml, uncommented."""
    lines = (ROOT / "deploy" / "fc" / "s.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# sessionAffinity: HEADER_FIELD")
    prefix = lines[start][:lines[start].index("#") + 2]
    block = []
    for line in lines[start:]:
        if not line.startswith(prefix):
            break
        block.append(line[len(prefix):])
    return dict(yaml.safe_load("\n".join(block)))


def test_fc_session_affinity_by_model_header(fc: dict[str, Any]) -> None:
    """Off in s.yaml (FC would make a session of every call without the
    header); uncommented, it is FC's HeaderFieldSessionAffinityConfig on the
    documented header, and the documented values are valid session ids."""
    assert "sessionAffinity" not in fc
    block = fc_session_affinity()
    assert block["sessionAffinity"] == "HEADER_FIELD"
    config = block["sessionAffinityConfig"]
    assert set(config) <= {"affinityHeaderFieldName", "sessionConcurrencyPerInstance",
                           "sessionTTLInSeconds", "sessionIdleTimeoutInSeconds",
                           "disableSessionIdReuse"}
    name = config["affinityHeaderFieldName"]
    # FC's rule for the name: a letter first, then letters, digits, - or _, 5-40 long, no x-fc-.
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{4,39}", name) and not name.lower().startswith("x-fc-")
    assert name.lower() == MODEL_HEADER.lower()
    assert 1 <= config["sessionConcurrencyPerInstance"] <= 200
    assert 1 <= config["sessionTTLInSeconds"] <= 21600
    assert 0 <= config["sessionIdleTimeoutInSeconds"] <= config["sessionTTLInSeconds"]
    # FC's rule for a session id: a letter, digit or _ first, then those or -, 1-64 long.
    for model in ("sd15/v1-5.safetensors", "tiny-sd15.safetensors", "été/ü x.ckpt", "a" * 200):
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}", model_token(model)), model
    assert model_token("sd15/v1-5.safetensors") == "sd15_v1-5_safetensors"


def test_ci_runs_kube_check_on_the_image_check_image() -> None:
    """CI plays the pods after scripts/image-check, with the image it built."""
    ci = (ROOT / ".ci" / "run").read_text()
    runs = [line.strip() for line in ci.splitlines() if line.startswith("scripts/")]
    assert "scripts/kube-check" in runs
    assert runs.index("scripts/kube-check") == runs.index("scripts/image-check") + 1
    kc = kube_check()
    assert kc.ic.TAG == "localhost/comfy-embed:check" and kc.OVERLAY == QUEUE
