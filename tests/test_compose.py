"""The deployment files: the compose file's structure, and its own commands run without Docker."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap

import httpx
import pytest
import yaml
from clitools import ROOT, dsm, spawn, stop
from helpers import until
from metricstools import scrape, wait_for

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_services_are_etcd_work_api_client_and_an_optional_prometheus():
    assert set(SERVICES) == {"etcd", "work", "api", "client", "prometheus"}
    assert SERVICES["prometheus"]["profiles"] == ["metrics"]  # not started by a plain `docker compose up`


def test_every_scale_command_shown_names_a_service():
    """`--scale NAME=N` in the compose file's comments and in the README must name a real service."""
    texts = {name: (ROOT / name).read_text() for name in ("docker-compose.yml", "README.md")}
    shown = [(where, name) for where, text in texts.items() for name in re.findall(r"--scale[ =](\S+?)=", text)]
    assert {where for where, _ in shown} == set(texts)
    assert all(name in SERVICES for _, name in shown), shown


def test_official_etcd_image_of_version_3_5_or_newer():
    image = SERVICES["etcd"]["image"]
    repo, _, tag = image.rpartition(":")
    assert repo in ("quay.io/coreos/etcd", "gcr.io/etcd-development/etcd")
    major, minor = map(int, re.match(r"v(\d+)\.(\d+)\.\d+$", tag).groups())
    assert (major, minor) >= (3, 5)


def test_etcd_healthcheck_is_exec_form():
    test = SERVICES["etcd"]["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] == "CMD" and "etcdctl" in test[1]
    assert "health" in test


def _host_port(spec: str) -> str:
    """The host port of a short-syntax port ("8080", "127.0.0.1::8080", "8080:8080", "ip:8080:8080")."""
    parts = str(spec).split(":")
    return "" if len(parts) == 1 else parts[-2]


def test_no_container_names_and_no_fixed_host_ports():
    for name, service in SERVICES.items():
        assert "container_name" not in service, name
        for port in service.get("ports", []):
            assert _host_port(port) == "", f"{name} publishes a fixed host port: {port}"


def test_api_serves_the_namespace_on_a_free_loopback_port_of_the_host():
    api = SERVICES["api"]
    command = api["command"]
    assert command[:2] == ["dsm", "api"] and command[command.index("--host") + 1] == "0.0.0.0"
    assert "--workers" not in command  # the workers run the instances; the API runs no handler
    assert api["environment"]["DSM_ETCD"] == "http://etcd:2379"
    assert api["environment"]["DSM_NAMESPACE"] == SERVICES["work"]["environment"]["DSM_NAMESPACE"]
    assert "DSM_API_TOKEN" in api["environment"]
    assert api["depends_on"]["etcd"]["condition"] == "service_healthy"
    (port,) = api["ports"]
    assert port.startswith("127.0.0.1:") and port.endswith(":" + command[command.index("--port") + 1])
    assert api["healthcheck"]["test"][0] == "CMD"


def test_worker_scales_and_waits_for_a_healthy_etcd():
    worker = SERVICES["work"]
    assert worker["build"] == "."
    assert worker["command"][:2] == ["dsm", "worker"]
    assert worker["environment"]["DSM_ETCD"] == "http://etcd:2379"
    assert worker["depends_on"]["etcd"]["condition"] == "service_healthy"
    assert worker["stop_signal"] == "SIGTERM"
    assert "container_name" not in worker and "ports" not in worker


def test_client_runs_an_example_against_the_workers():
    client = SERVICES["client"]
    assert client["command"][:2] == ["dsm", "run"] and "--workers" in client["command"]
    assert client["command"][client["command"].index("--workers") + 1] == "0"
    assert client["environment"]["DSM_ETCD"] == "http://etcd:2379"


def test_workers_serve_every_example_machine():
    served = {arg for arg in SERVICES["work"]["command"] if str(arg).endswith(".yaml")}
    assert served == {f"definitions/{p.name}" for p in (ROOT / "definitions").glob("*.yaml")
                      if not p.name.endswith(".test.yaml")}


def test_workers_expose_metrics_on_the_compose_network_and_prometheus_scrapes_them():
    worker = SERVICES["work"]
    env = worker["environment"]
    port = int(env["DSM_METRICS_PORT"])
    assert env["DSM_METRICS_HOST"] == "0.0.0.0"  # inside the container: reachable from the compose network
    assert [int(p) for p in worker["expose"]] == [port]
    prometheus = SERVICES["prometheus"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"]}
    config_file = ROOT / mounted["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load(config_file.read_text())
    job, = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    discovery, = job["dns_sd_configs"]
    assert discovery["names"] == ["work"] and discovery["type"] == "A" and discovery["port"] == port
    assert prometheus["ports"] == ["127.0.0.1::9090"]  # its web UI, on a free port of the host's loopback only


def test_workers_have_a_healthcheck_on_their_health_port():
    """The healthcheck asks the worker's /healthz, on the container's loopback, with the image's Python."""
    worker = SERVICES["work"]
    env = worker["environment"]
    assert int(env["DSM_HEALTH_PORT"]) not in (8080, int(env["DSM_METRICS_PORT"]))
    assert env.get("DSM_HEALTH_HOST", "127.0.0.1") == "127.0.0.1"  # asked from inside the container only
    check = worker["healthcheck"]
    test = check["test"]
    assert test[:3] == ["CMD", "python", "-c"] and len(test) == 4
    assert "http://127.0.0.1:%s/healthz" in test[3] and "DSM_HEALTH_PORT" in test[3]
    assert {"interval", "timeout", "retries", "start_period"} <= set(check)
    assert worker["restart"] == "unless-stopped"  # a worker that fails exits; it is started again


def test_the_healthcheck_shown_in_the_operations_guide_is_the_compose_files():
    text = (ROOT / "docs" / "operations.md").read_text()
    shown = [yaml.safe_load(textwrap.dedent(block)) for block in re.findall(r"```yaml\n(.*?)```", text, re.S)
             if "healthcheck:" in block]
    assert len(shown) == 1
    assert shown[0]["healthcheck"] == SERVICES["work"]["healthcheck"]
    assert shown[0]["environment"]["DSM_HEALTH_PORT"] == SERVICES["work"]["environment"]["DSM_HEALTH_PORT"]


def healthcheck(port: str) -> int:
    """The exit code of the worker service's healthcheck command, run here against a worker
    whose health port is `port`."""
    _, _, flag, code = SERVICES["work"]["healthcheck"]["test"]
    return subprocess.run([sys.executable, flag, code], env={"DSM_HEALTH_PORT": port}, timeout=30,
                          capture_output=True).returncode


def test_every_definition_the_compose_file_names_exists_and_validates():
    named = [arg for s in SERVICES.values() for arg in s.get("command", []) if str(arg).endswith(".yaml")]
    assert named
    for path in named:
        assert (ROOT / path).is_file(), path
    assert dsm("validate", *named).returncode == 0


def test_dockerfile_installs_the_project_and_ships_the_definitions():
    assert re.search(r"^FROM python:3\.1\d", DOCKERFILE, re.M)
    for needed in ("pyproject.toml", "dsm", "schemas", "definitions"):
        assert re.search(rf"^COPY .*\b{re.escape(needed)}\b", DOCKERFILE, re.M), needed
        assert (ROOT / needed).exists()
    assert re.search(r"^RUN pip install \"\.\[api\]\"$", DOCKERFILE, re.M), "the image has the API's extra"
    assert re.search(r"^USER ", DOCKERFILE, re.M) and re.search(r"^EXPOSE 8080$", DOCKERFILE, re.M)


@pytest.mark.etcd
def test_the_compose_topology_without_docker(etcd, namespace):
    """etcd + three workers + the client, as separate processes, running the compose file's own
    commands with its environment; the metrics and the health on free loopback ports each instead
    of the container's ports, each worker's scrape counts what it did, and its healthcheck passes."""
    env = {"DSM_ETCD": etcd.endpoint, "DSM_NAMESPACE": namespace}
    worker_env = {**SERVICES["work"]["environment"], **env, "DSM_METRICS_HOST": "127.0.0.1", "DSM_METRICS_PORT": "0",
                  "DSM_HEALTH_PORT": "0"}
    workers = [spawn(*SERVICES["work"]["command"][1:], **worker_env) for _ in range(3)]
    urls, health_ports = [], []
    try:
        client = dsm(*SERVICES["client"]["command"][1:], timeout=90, **env)
        for w in workers:  # a process signalled before Python set up its handlers would just die
            first = json.loads(w.stderr.readline())  # DSM_LOG_FORMAT=json: one object per line
            assert "serving namespace" in first["message"] and first["worker"].endswith(f":{w.pid}")
            urls.append(re.search(r"metrics on (http://\S+/metrics)", first["message"]).group(1))
            health_ports.append(re.search(r"health on http://127\.0\.0\.1:(\d+)/healthz", first["message"]).group(1))
        assert client.returncode == 0, client.stderr
        record = json.loads(client.stdout)
        # each worker counts a commit once etcd has answered it, maybe just after the client saw it
        counted = wait_for(lambda: sum(scrape(url).get(("dsm_transitions_total", (("machine", "order"),)), 0)
                                       for url in urls) == record["transitions"], timeout=10)
        healthy = [wait_for(lambda port=port: healthcheck(port) == 0, timeout=30) for port in health_ports]
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        errors = [w.communicate(timeout=60)[1] for w in workers]
    assert record["status"] == "succeeded" and record["state"] == "done"
    worker_pids = {str(w.pid) for w in workers}
    assert {h["worker"].rpartition(":")[2] for h in record["history"]} <= worker_pids  # the client ran nothing
    assert [w.returncode for w in workers] == [0, 0, 0], errors  # SIGTERM is a graceful stop
    assert counted, "the workers' dsm_transitions_total do not add up to the instance's transitions"
    assert healthy == [True, True, True]
    assert healthcheck(health_ports[0]) != 0  # and fails once the worker is gone
    for text in errors:
        assert all(json.loads(line) for line in text.splitlines())


def test_etcd_runs_with_a_quota_and_auto_compaction():
    """The second line of defence behind housekeeping (docs/operations.md)."""
    flags = dict(arg.split("=", 1) for arg in SERVICES["etcd"]["command"] if "=" in arg)
    assert int(flags["--quota-backend-bytes"]) >= 2 * 1024**3
    assert flags["--auto-compaction-mode"] == "periodic" and flags["--auto-compaction-retention"]


def _serving(proc) -> str:
    line = proc.stderr.readline()
    assert "dsm api serving" in line, line
    return line.split("serving ")[1].split()[0]


def _local(command: list[str]) -> list[str]:
    """The api service's command, listening on a free loopback port instead of 0.0.0.0:8080."""
    args = list(command[1:])
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = "0"
    return args


@pytest.mark.etcd
def test_the_api_service_starts_on_every_interface_without_a_token(etcd, namespace):
    """`docker compose up` with DSM_API_TOKEN unset (compose passes it empty): the api service,
    which listens on 0.0.0.0 inside its container, starts, and warns that its actions are open."""
    args = list(SERVICES["api"]["command"][1:])
    assert args[args.index("--host") + 1] == "0.0.0.0"
    args[args.index("--port") + 1] = "0"
    env = {**SERVICES["api"]["environment"], "DSM_ETCD": etcd.endpoint, "DSM_NAMESPACE": namespace,
           "DSM_API_TOKEN": ""}
    api = spawn(*args, **env)
    try:
        url = _serving(api).replace("0.0.0.0", "127.0.0.1")
        assert httpx.get(f"{url}/api/workers", timeout=30).status_code == 200
    finally:
        stderr = stop(api)
    assert api.returncode == 0, stderr
    assert "warning: --no-token" in stderr and "anyone" in stderr, stderr


@pytest.mark.etcd
@pytest.mark.slow
def test_the_api_topology_without_docker(etcd, namespace):
    """etcd + two workers + the API, as separate processes running the compose file's own commands,
    and a client that uses only the API, over HTTP: start, follow, signal, cancel, list, delete."""
    env = {"DSM_ETCD": etcd.endpoint, "DSM_NAMESPACE": namespace}
    api = spawn(*_local(SERVICES["api"]["command"]), **env, DSM_API_TOKEN="t0ken")
    workers = [spawn(*SERVICES["work"]["command"][1:], **env) for _ in range(2)]
    try:
        url = _serving(api)
        for w in workers:
            assert "serving namespace" in w.stderr.readline()
        auth = {"authorization": "Bearer t0ken"}
        with httpx.Client(base_url=url, timeout=30) as http:
            until(lambda: len(http.get("/api/workers").json()["items"]) >= 2, "two workers registered (each as it "
                  "starts)", timeout=60)
            assert {m["machine"] for m in http.get("/api/machines").json()["items"]} >= {"order", "approval"}
            assert http.post("/api/machines/order/instances", json={"payload": {}}).status_code == 401
            with http.stream("GET", "/api/events") as events:
                lines = events.iter_lines()
                assert next(line for line in lines if line.startswith("event: ")) == "event: ready"
                orders = []
                for total in (120, 40, 7):
                    response = http.post("/api/machines/order/instances", json={"payload": {"total": total}},
                                         headers=auth)
                    assert response.status_code == 201, response.text
                    orders.append(response.json()["id"])
                ended: set[str] = set()
                for line in lines:  # each instance's summary, as each transition commits, until all succeed
                    if line.startswith("data: ") and '"status":"succeeded"' in line:
                        ended.add(json.loads(line[6:])["id"])
                        if ended >= set(orders):
                            break
            approval = http.post("/api/machines/approval/instances", json={"payload": {"amount": 9}, "id": "ap-1"},
                                 headers=auth).json()["id"]
            until(lambda: http.get(f"/api/instances/{approval}").json()["waiting"], "the approval waits", timeout=60)
            signalled = http.post(f"/api/instances/{approval}/signals/decision", headers=auth,
                                  json={"outcome": "approve", "payload": {"by": "ann"}})
            assert signalled.status_code == 202, signalled.text
            record = until(lambda: (r := http.get(f"/api/instances/{approval}").json())["status"] != "running" and r,
                           "the approval ended", timeout=60)
            assert record["status"] == "succeeded" and record["payload"]["by"] == "ann"
            listed = http.get("/api/instances", params={"status": "succeeded", "limit": 2}).json()
            assert len(listed["items"]) == 2 and listed["next"]
            rest = http.get("/api/instances", params={"status": "succeeded", "after": listed["next"]}).json()
            assert {i["id"] for i in listed["items"] + rest["items"]} == {*orders, approval}
            records = [http.get(f"/api/instances/{iid}").json() for iid in (*orders, approval)]
            assert http.delete(f"/api/instances/{approval}", headers=auth).status_code == 200
            assert http.get(f"/api/instances/{approval}").status_code == 404
    finally:
        for proc in (api, *workers):
            proc.send_signal(signal.SIGTERM)
        errors = [proc.communicate(timeout=60)[1] for proc in (api, *workers)]
    worker_pids = {str(w.pid) for w in workers}
    ran = {h["worker"].rpartition(":")[2] for r in records for h in r["history"]}
    assert ran <= worker_pids, (ran, worker_pids)  # the API ran no tick
    assert [p.returncode for p in (api, *workers)] == [0, 0, 0], errors
