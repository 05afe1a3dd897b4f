"""The files in deploy/ parse, agree with each other, and pass the real tools' checks when installed."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from bridge.net.intercept import parse_rules
from bridge.net.sidecar_command import sidecar
from bridge.settings import load

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def documents(name: str) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc}


def test_kubernetes_manifests_probe_the_management_port_and_read_secrets() -> None:
    manifests = documents("kubernetes/sidecar.yaml")
    assert set(manifests) == {"Deployment", "Service", "PodDisruptionBudget"}
    deployment, service = manifests["Deployment"], manifests["Service"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    ports = {port["name"]: port for port in container["ports"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "management"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "management"}
    assert ports["shares"]["protocol"] == "UDP" and ports["shares"]["hostPort"] == ports["control"]["containerPort"]
    args = dict(arg.removeprefix("--").split("=", 1) for arg in container["args"][1:])
    assert args["status-listen"].endswith(f":{ports['management']['containerPort']}")
    assert args["advertise"] == f"$(NODE_IP):{ports['shares']['containerPort']}"
    # Every option the manifest passes exists on `stratumrm sidecar`.
    known = {option.lstrip("-") for param in sidecar.params for option in param.opts}
    assert set(args) <= known
    # Drain fits in the grace period Kubernetes gives before SIGKILL.
    assert float(args["drain-timeout"]) < pod["terminationGracePeriodSeconds"]
    # Certificates and config come from Secrets, mounted where the args point.
    secrets = {volume["name"]: volume["secret"]["secretName"] for volume in pod["volumes"]}
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    for option in ("cert", "key", "ca", "revocations"):
        assert any(args[option].startswith(mounts[name] + "/") for name in secrets), option
    env = {item["name"]: item["valueFrom"] for item in container["env"]}
    assert "secretKeyRef" in env["POOL_URL"] and env["NODE_IP"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "control"


def test_prometheus_scrapes_several_sidecars() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus-sidecars.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = jobs["stratumrm-sidecar"]["static_configs"][0]["targets"]
    assert len(targets) >= 2 and all(target.endswith(":9101") for target in targets)
    assert jobs["stratumrm-sidecar-kubernetes"]["kubernetes_sd_configs"] == [{"role": "pod"}]


def test_the_intercept_example_loads() -> None:
    config = load(DEPLOY / "proxy-intercept.toml", "proxy")
    rules = parse_rules(config.intercept)
    assert config.intercept_default == "pass" and [r.port for r in rules] == [3333, 4444]
    assert tomllib.loads((DEPLOY / "proxy-intercept.toml").read_text())["listen"].endswith(":3335")


def test_haproxy_config_sends_proxy_v2_and_checks_readiness(tmp_path: Path) -> None:
    text = (DEPLOY / "haproxy/haproxy.cfg").read_text()
    assert "mode tcp" in text and "send-proxy-v2" in text and "GET /readyz" in text and "option redispatch" in text
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (tests/setup-system.sh installs it); the text checks passed")
    # The stats socket's directory may not exist here: check a copy that puts it in tmp_path.
    copy = tmp_path / "haproxy.cfg"
    copy.write_text(text.replace("/run/haproxy/admin.sock", str(tmp_path / "admin.sock")))
    result = subprocess.run(["haproxy", "-c", "-f", str(copy)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_nftables_rules_check(tmp_path: Path) -> None:
    text = (DEPLOY / "nftables/gateway.nft").read_text()
    assert "redirect to :3335" in text
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed (tests/setup-system.sh installs nftables); the text checks passed")
    result = subprocess.run(
        ["nft", "-c", "-f", str(DEPLOY / "nftables/gateway.nft")], check=False, capture_output=True, text=True
    )
    if result.returncode != 0 and "Operation not permitted" in result.stderr:
        pytest.skip("nft -c needs CAP_NET_ADMIN (run as root)")
    assert result.returncode == 0, result.stderr
