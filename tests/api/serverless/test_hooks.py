"""Issue 25, item 5, against a real server: the lifecycle hooks are the
platform's (Function Compute's own calls, a direct loopback connection, or
the operator key), whatever API key a caller has; and a drained instance
ends (the process exits 0 once /pre-stop has answered)."""

from __future__ import annotations

from pathlib import Path

import requests

from tests.conftest import image_only
from tests.servers import Server

ADMIN = "operator-key-0123456789"
# Through a proxy or FC's gateway the peer is the relay, never the caller.
REMOTE = {"X-Forwarded-For": "203.0.113.9"}


def test_hooks_refuse_clients_and_a_drained_instance_exits(tmp_path: Path) -> None:
    s = Server(tmp_path, api_keys="client-key", admin_key=ADMIN,
               raw_env={"ALIBABA_CLOUD_ACCESS_KEY_SECRET": "role-secret"})
    try:
        s.wait_ready()
        client = {**REMOTE, "X-Api-Key": "client-key"}
        forged_fc = {"X-Fc-Request-Id": "r1", "X-Fc-Access-Key-Id": "id",
                     "X-Fc-Access-Key-Secret": "guess"}
        for h in (REMOTE, client, forged_fc, {**client, "X-Admin-Key": "wrong"}):
            for method in ("get", "post"):
                r = requests.request(method, s.url + "/pre-stop", headers=h, timeout=30)
                assert r.status_code == 403, (h, r.text)
                assert r.json()["data"]["error"]["type"] == "forbidden"
        # The hooks that change nothing stay open: FC's initializer must
        # never be refused (an instance whose initializer fails never starts).
        assert requests.post(f"{s.url}/initialize", headers=REMOTE, timeout=60).status_code == 200
        assert requests.get(f"{s.url}/pre-freeze", headers=REMOTE, timeout=60).status_code == 200
        # Nothing was drained: the instance still serves its clients.
        assert requests.get(f"{s.url}/ready", timeout=10).status_code == 200
        assert s.run(image_only(batch=1), headers=client).status_code == 200
        # The platform's own calls: FC's (its role's secret), the operator's.
        fc = {"X-Fc-Request-Id": "r2", "X-Fc-Access-Key-Id": "id",
              "X-Fc-Access-Key-Secret": "role-secret"}
        assert requests.post(f"{s.url}/initialize", headers=fc, timeout=60).status_code == 200
        r = requests.get(f"{s.url}/pre-freeze", headers={**REMOTE, "X-Admin-Key": ADMIN}, timeout=60)
        assert r.status_code == 200, r.text
        assert requests.get(f"{s.url}/health", timeout=10).status_code == 200
        r = requests.get(f"{s.url}/pre-stop", headers=fc, timeout=120)
        assert r.status_code == 200 and r.json() == {"status": "drained"}, r.text
        # Drained for good: the process ends (as after SIGTERM's drain), so
        # the platform or the liveness probe replaces it.
        assert s.proc.wait(60) == 0, s.log()
    finally:
        s.stop()
    assert "refused lifecycle hook /pre-stop" in s.log_path.read_text()


def test_the_kubernetes_pre_stop_hook_drains_over_loopback(tmp_path: Path) -> None:
    """deploy/k8s/base/deployment.yaml's preStop command, run as the kubelet runs
    it (inside the container: here, beside the server), drains and ends it."""
    import os
    import subprocess
    import sys

    import yaml

    from tests.test_deploy import BASE
    deployment = next(d for d in yaml.safe_load_all((BASE / "deployment.yaml").read_text())
                      if d and d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    s = Server(tmp_path, api_keys="client-key")
    try:
        s.wait_ready()
        hook = subprocess.run([sys.executable, *command[1:]], timeout=120,
                              env={**os.environ, "COMFY_EMBED_PORT": str(s.port)})
        assert hook.returncode == 0
        assert s.proc.wait(60) == 0, s.log()
    finally:
        s.stop()
