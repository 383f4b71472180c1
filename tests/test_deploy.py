# SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause
"""Deployment files: the compose file validates, the Dockerfile copies only what exists, and the
example configuration in conf/ starts a real broker as it is."""
import re
import shutil
import subprocess

from conftest import AKENZACTL, PLUGIN, ROOT, free_port, run
from edge import Sensor


def test_compose_files_validate():
    """docker-compose.yml with the override docker-compose reads by itself (the published port)."""
    r = subprocess.run(["docker-compose", "config"], cwd=ROOT / "docker", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "restart: unless-stopped" in r.stdout and "published: 1883" in r.stdout
    assert "/mosquitto/keys:ro" in r.stdout and "mosquitto-data:/mosquitto/data" in r.stdout


def test_dockerfile_copies_only_what_exists():
    """Every COPY source exists and gets past .dockerignore, which lets through only what is copied."""
    text = (ROOT / "docker" / "Dockerfile").read_text()
    sources = []
    for line in text.splitlines():
        m = re.match(r"\s*COPY\s+(?!--from)(.+)", line)
        if m:
            sources += m.group(1).split()[:-1]
    assert sources, "no COPY lines found"
    allowed = [line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
        assert any(src.rstrip("/") == a or src.startswith(a + "/") for a in allowed), \
            f"Dockerfile copies {src}, which .dockerignore leaves out"
    assert "USER mosquitto" in text and "--uid 1883" in text and "make unit" in text


def test_example_conf_starts_a_broker(tmp_path, brokers):
    """conf/ as shipped, with only its container paths pointed at a temporary directory (and the
    upstream at a closed local port: no network here)."""
    cfg = tmp_path / "config"
    shutil.copytree(ROOT / "conf", cfg)
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    run([str(AKENZACTL), "keygen", "--device", "demo-sensor-01", "--type", "ec", "--out", str(keys)])
    port = free_port()
    conf = (cfg / "mosquitto.conf").read_text()
    conf = conf.replace("/mosquitto/config/", f"{cfg}/").replace("/mosquitto/keys", str(keys))
    conf = conf.replace("/mosquitto/data/", f"{tmp_path}/").replace("/usr/lib/mosquitto/mosquitto_akenza.so", str(PLUGIN))
    conf = conf.replace("listener 1883", f"listener {port} 127.0.0.1")
    conf = conf.replace("log_dest stderr\n", "")
    conf += f"plugin_opt_upstream_host localhost\nplugin_opt_upstream_port {free_port()}\n"
    b = brokers(conf, port, name="example")
    s = Sensor(port, "demo-sensor-01", "secret")
    assert s.connect() == 0
    s.publish("/up/device/id/demo-sensor-01", b'{"temperature":22}')
    h = Sensor(port, "health", "health")
    assert h.connect() == 0
    h.subscribe("$SYS/broker/uptime")
    from conftest import wait_for
    wait_for(lambda: any(t == "$SYS/broker/uptime" for t, p in h.received()), 15, what="uptime for the healthcheck")
    assert "akenza: 1 devices, 0 gateways" in b.log()
