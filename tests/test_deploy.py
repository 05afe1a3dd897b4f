"""deploy/: the systemd units, the compose stack, Prometheus, Grafana and the example configs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from bridge import settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
INSTALLED = "/opt/stratumrm/venv/bin/stratumrm"


def test_both_roles_have_a_unit() -> None:
    assert [unit.name for unit in UNITS] == ["stratumrm-proxy.service", "stratumrm-sidecar.service"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_units_run_as_a_dedicated_hardened_user(unit: Path) -> None:
    text = unit.read_text()
    service = dict(
        line.split("=", 1)
        for line in text.split("[Service]")[1].split("[Install]")[0].splitlines()
        if line and not line.startswith("#")
    )
    assert service["User"] == "stratumrm" and service["Group"] == "stratumrm"
    assert "DynamicUser" not in service  # the certificates are owned by a group that must exist
    assert service["Restart"] == "on-failure" and service["RestartPreventExitStatus"] == "2"
    assert int(service["LimitNOFILE"]) >= 65536  # a connection per rig (and one upstream per rig)
    assert service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] == "yes"
    assert service["CapabilityBoundingSet"] == ""
    role = "sidecar" if "sidecar" in unit.name else "proxy"
    assert service["ExecStart"] == f"{INSTALLED} {role} --config /etc/stratumrm/{role}.toml"
    assert "pip install stratumrm-bridge" not in text  # the package name is not published


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_units_pass_systemd_analyze(unit: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (tests/setup-system.sh installs systemd)")
    stratumrm = shutil.which("stratumrm") or shutil.which("true")
    copy = tmp_path / unit.name
    # verify checks that ExecStart exists: point it at this machine's stratumrm.
    copy.write_text(unit.read_text().replace(INSTALLED, stratumrm))
    verify = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=120, check=False)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    # Exposure 0-100 (shown as 0.0-10.0): these units score about 17 ("OK"); 30 still counts as "OK".
    security = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=30", str(copy)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if "--offline" in security.stderr and "unrecognized" in security.stderr:
        pytest.skip("this systemd-analyze has no offline security check")
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_the_compose_file_runs_the_pool_side_and_its_monitoring() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"pool", "pki", "sidecar", "prometheus", "grafana"} <= set(services)
    assert {"proxy", "miner"} <= set(services) and services["proxy"]["profiles"] == ["farm"]
    sidecar = services["sidecar"]
    assert sidecar["build"]["dockerfile"] == "deploy/Containerfile" and sidecar["build"]["context"] == ".."
    assert sidecar["command"][:3] == ["sidecar", "--config", "/etc/stratumrm/sidecar.toml"]
    assert "${POOL_URL:-stratum+tcp://pool:3333}" in sidecar["command"]  # the operator's pool, or the reference one
    assert {"3334:3334/tcp", "3334:3334/udp"} <= set(sidecar["ports"])
    assert sidecar["depends_on"]["pki"]["condition"] == "service_completed_successfully"
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is not in deploy/"
    grafana = services["grafana"]
    assert any(v.startswith("./grafana/stratumrm.json:") for v in grafana["volumes"])
    # What the services run are real stratumrm commands.
    from bridge.cli import _register_optional, cli

    _register_optional()
    for name in ("pool", "sidecar", "proxy", "miner"):
        assert services[name]["command"][0] in cli.commands, name


def test_compose_itself_accepts_the_compose_file() -> None:
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose is not installed (tests/setup-system.sh installs it)")
    command = [compose, "-f", str(DEPLOY / "compose.yaml"), "--profile", "farm"]
    result = subprocess.run([*command, "config"], capture_output=True, text=True, timeout=60, cwd=DEPLOY.parent, check=False)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) == {"pki", "pool", "sidecar", "prometheus", "grafana", "proxy", "miner"}
    assert resolved["services"]["sidecar"]["image"] == "localhost/stratumrm:latest"  # the shared x-image anchor
    assert "COMPOSE_PROJECT_NAME=stratumrm" in (DEPLOY / ".env").read_text().splitlines()  # the project's name


def test_prometheus_scrapes_every_role_that_compose_runs() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: [t for group in job["static_configs"] for t in group["targets"]] for job in config["scrape_configs"]
    }
    assert targets == {"stratumrm-sidecar": ["sidecar:9101"], "stratumrm-proxy": ["proxy:9100"]}
    sidecar_settings = settings.load(DEPLOY / "config" / "sidecar.toml", "sidecar")
    assert sidecar_settings.http_listen.endswith(":9101")
    proxy_command = _compose()["services"]["proxy"]["command"]
    assert proxy_command[proxy_command.index("--http-listen") + 1].endswith(":9100")


def _metric_names() -> set[str]:
    """Every name the roles expose: bridge/web's families (counters get _total) and the process collector's."""
    web = Path(__file__).resolve().parent.parent / "bridge" / "web"
    if not (web / "roles.py").exists():
        pytest.skip("bridge/web (the management port, helper web) is not in this tree yet")
    source = "\n".join(path.read_text() for path in web.glob("*.py"))
    names = set()
    for kind, name in re.findall(r"\b(counter|counters_by|declare_counter|gauge|declare_gauge)\(\s*\"([a-z_]+)\"", source):
        names.add("stratumrm_" + name + ("_total" if "counter" in kind else ""))
    names |= {
        f"stratumrm_process_{n}"
        for n in (
            "cpu_seconds_total",
            "resident_memory_bytes",
            "virtual_memory_bytes",
            "open_fds",
            "max_fds",
            "start_time_seconds",
        )
    }
    return names


def test_the_grafana_dashboard_loads_and_uses_existing_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "stratumrm.json").read_text())
    assert dashboard["uid"] and dashboard["title"] == "StratumRM Bridge"
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    used = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used |= set(re.findall(r"\bstratumrm_[a-z_]+", target["expr"]))
    # The list: rigs, shares by outcome, failovers, UDP, RTT, certificates, refusals, resources.
    for needed in (
        "stratumrm_rigs_connected",
        "stratumrm_shares_rejected_total",
        "stratumrm_failovers_total",
        "stratumrm_datagrams_dropped_total",
        "stratumrm_rtt_seconds",
        "stratumrm_certificate_days_left",
        "stratumrm_admission_refusals_total",
        "stratumrm_process_cpu_seconds_total",
    ):
        assert needed in used
    unknown = used - _metric_names()
    assert not unknown, f"the dashboard queries metrics no role exposes: {sorted(unknown)}"


def test_the_provisioning_points_grafana_at_the_dashboard_and_prometheus() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    dashboard = json.loads((DEPLOY / "grafana" / "stratumrm.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]}
    assert uids == {source["uid"]} and source["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards" / "stratumrm.yml").read_text())["providers"][0]
    grafana = _compose()["services"]["grafana"]
    mounted = {v.split(":")[1] for v in grafana["volumes"]}
    assert f"{provider['options']['path']}/stratumrm.json" in mounted


@pytest.mark.parametrize("role", ["proxy", "sidecar"])
def test_the_example_configs_are_valid(role: str) -> None:
    path = DEPLOY / "config" / f"{role}.toml"
    checked_role, chosen, _warnings = settings.check_file(path, files=False)
    assert checked_role == role
    assert chosen.log_format in ("text", "json")


def test_the_containerfile_installs_this_clone_as_a_non_root_user() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    assert "pip wheel" in text and "COPY bridge ./bridge" in text and "pip install --no-cache-dir /wheels/*.whl" in text
    assert re.search(r"^USER stratumrm$", text, re.MULTILINE)
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert 'ENTRYPOINT ["stratumrm"]' in text


def test_the_walkthrough_installs_from_a_clone() -> None:
    text = (DEPLOY / "README.md").read_text()
    assert "pip install /opt/stratumrm/src" in text and "pip wheel" in text
    assert "pip install stratumrm-bridge" not in text
    for name in ("systemd-sysusers", "compose.yaml", "stratumrm config check", "grafana/stratumrm.json"):
        assert name in text
