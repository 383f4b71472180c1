# SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause
"""The container image run as the README's "Docker and docker-compose" section tells a user, its
commands taken from the README itself: built from docker/Dockerfile, configured from conf/, a key
made by the image's akenzactl, config and keys owned by uid 1883, run with `docker run` and with
`docker-compose up` against the akenza stand-in on loopback. The test's only departures from the
README are listed where they are made (the host network, a free listener port, the stand-in as
upstream). The engine and the base image come from dockerlane.py (make docker-integration)."""
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import Cryptodome.PublicKey.ECC
import pytest

from conftest import BUILD, ROOT, free_port, wait_for
from dockerlane import Engine, inspect, make_base_image
from edge import Sensor

DEVICE, PASSWORD = "demo-sensor-01", "secret"      # the example entry of conf/devices.json
IMAGE = "mosquitto-akenza"
UP, DOWN = f"/up/device/id/{DEVICE}", f"/down/device/id/{DEVICE}"
CONNECTED = f"akenza: device '{DEVICE}': connected"
HOST_OVERRIDE = ROOT / "tests" / "docker-compose.host.yml"


def readme_steps():
    """The command lines of the README's Docker section, in order (continuation lines joined)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Docker and docker-compose\n", 1)[1].split("\n## ", 1)[0]
    lines = [line[4:] for line in section.splitlines() if line.startswith("    ") and line.strip()]
    return [s.strip() for s in "\n".join(lines).replace("\\\n", " ").splitlines()]


def step(prefix, *subs):
    """The one README command starting with prefix, with each (old, new) substitution applied;
    fails if the README no longer has that command or the text a substitution replaces."""
    found = [s for s in readme_steps() if s.startswith(prefix)]
    assert len(found) == 1, f"README, Docker section: {len(found)} commands start with {prefix!r}"
    cmd = found[0]
    for old, new in subs:
        assert old in cmd, f"README, Docker section: {cmd!r} no longer has {old!r}"
        cmd = cmd.replace(old, new)
    return cmd


def sh(engine, cmd, cwd, timeout=120, env=None):
    """Runs a README command with bash against the lane's engine, with Debian's docker CLI first
    on PATH; the CompletedProcess, or an AssertionError with its output."""
    e = engine.env()
    e["PATH"] = "/usr/bin:/usr/sbin:" + e.get("PATH", "")
    e.update(env or {})
    r = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\n(in {cwd}): exit {r.returncode}\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
    return r


def output(r):
    return r.stdout + r.stderr


def no_sudo(cmd):
    """sudo is the README's way to root; the lane runs as root (and CI machines may lack sudo)."""
    return cmd.replace("sudo ", "", 1) if os.geteuid() == 0 and cmd.startswith("sudo ") else cmd


@pytest.fixture(scope="session")
def engine():
    e = Engine(BUILD / "docker").start()
    yield e
    e.stop()


@pytest.fixture(scope="session")
def image(engine):
    """The README's `docker build`, on the base images its Dockerfile names (made by debootstrap
    when the engine lacks them). Only a shared engine's image is removed afterwards: the lane's
    own engine keeps its images in BUILD/docker as a build cache."""
    bases = set(re.findall(r"^FROM\s+(\S+)", (ROOT / "docker" / "Dockerfile").read_text(), re.M))
    for base in sorted(bases):
        if not engine.has_image(base):
            assert base in ("debian:12", "debian:12-slim"), f"docker/Dockerfile: no way to make {base} here"
            make_base_image(engine, BUILD / "docker" / "base", base)
    # the lane's engine makes no bridge: the build's RUN steps reach the apt mirror on the host's network
    build = step("docker build ", ("docker build ", "docker build --network host "))
    sh(engine, build, ROOT, timeout=1800)
    yield IMAGE
    if engine.own_pid is None:
        engine.docker("rmi", IMAGE, check=False, timeout=120)
    else:
        # the cache keeps the base, this image and its build stage (tagged, from the layers just
        # built); older builds' untagged images go
        stage = step("docker build ", ("docker build ", "docker build --network host "),
                     (f" -t {IMAGE} ", f" --target build -t {IMAGE}-build "))
        sh(engine, stage, ROOT, timeout=300)
        engine.docker("image", "prune", "-f", timeout=300)


class Gateway:
    """The README's steps up to the start: a copy of docker/ and conf/ in a temporary directory,
    config/ and keys/ owned by 1883, the device key made by the image's akenzactl; then the config
    pointed at the stand-in (the test's part: a free listener port on 127.0.0.1, the stand-in's
    host, port and CA)."""

    def __init__(self, engine, tmp_path, standin, pki):
        self.engine = engine
        repo = tmp_path / "repo"
        shutil.copytree(ROOT / "docker", repo / "docker")
        shutil.copytree(ROOT / "conf", repo / "conf")
        sh(engine, step("cd docker && "), repo)
        self.dir = repo / "docker"
        sh(engine, no_sudo(step("sudo chown ")), self.dir)
        self.kid = sh(engine, step("docker run --rm "), self.dir).stdout.strip()
        self.port = free_port()
        conf = self.dir / "config" / "mosquitto.conf"
        text = conf.read_text()
        assert "\nlistener 1883\n" in text
        text = text.replace("\nlistener 1883\n", f"\nlistener {self.port} 127.0.0.1\n")
        ca = self.dir / "config" / "akenza-ca.crt"
        shutil.copy(pki.ca_cert, ca)
        os.chown(ca, 1883, 1883)
        conf.write_text(text + f"plugin_opt_upstream_host localhost\nplugin_opt_upstream_port {standin.port}\n"
                        "plugin_opt_upstream_cafile /mosquitto/config/akenza-ca.crt\n")
        standin.register(DEVICE, self.dir / "keys" / f"{DEVICE}.pub.pem")    # the upload to akenza

    def logs(self, cid):
        return output(self.engine.docker("logs", cid, timeout=30))


def check_keys(gw):
    """akenzactl in the image made a private key only its user reads and printed akenza's kid of it."""
    priv, pub = gw.dir / "keys" / f"{DEVICE}.pem", gw.dir / "keys" / f"{DEVICE}.pub.pem"
    st = priv.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1883, 1883, 0o600)
    der = Cryptodome.PublicKey.ECC.import_key(pub.read_text()).export_key(format="DER")
    assert gw.kid == hashlib.sha256(der).hexdigest()


def check_gateway(gw, cid, standin, restart, readme_logs):
    """What a user of a running container relies on; restart() restarts the container,
    readme_logs() runs the README's command that shows its log and returns that."""
    engine = gw.engine
    c = inspect(engine, cid)
    assert c["HostConfig"]["NetworkMode"] == "host"
    mounts = {m["Destination"]: m for m in c["Mounts"]}
    assert mounts["/mosquitto/keys"]["Source"] == str(gw.dir / "keys") and mounts["/mosquitto/keys"]["RW"] is False
    assert mounts["/mosquitto/config"]["Source"] == str(gw.dir / "config")
    assert mounts["/mosquitto/data"]["Type"] == "volume"
    # the broker itself (the container's first process) runs as 1883, as the kernel sees it
    pid = c["State"]["Pid"]
    status = open(f"/proc/{pid}/status").read()
    assert open(f"/proc/{pid}/comm").read().strip() == "mosquitto"
    assert re.search(r"^Uid:\s+1883\s+1883\s+1883\s+1883$", status, re.M), status
    assert re.search(r"^Gid:\s+1883\s+1883\s+1883\s+1883$", status, re.M), status
    # its log lines reach `docker logs` as they are written, not when a buffer fills
    wait_for(lambda: CONNECTED in gw.logs(cid), 30, 0.5, what=f"'{CONNECTED}' in docker logs")
    assert inspect(engine, cid, "{{json .State.Running}}") is True
    out = readme_logs()
    assert CONNECTED in out, out[-3000:]
    # a reading goes up, a downlink comes down
    s = Sensor(gw.port, DEVICE, PASSWORD)
    assert s.connect() == 0
    s.subscribe(DOWN + "/#")
    s.publish(UP, b'{"temperature":21.5}')
    wait_for(lambda: b'{"temperature":21.5}' in standin.uplinks(UP), 20, what="the reading at the stand-in")
    standin.publish_downlink(DEVICE, b'{"setpoint":19}', "/config")
    wait_for(lambda: (DOWN + "/config", b'{"setpoint":19}') in s.received(), 20, what="the downlink at the sensor")
    assert "New client connected from 127.0.0.1" in gw.logs(cid)
    # the image's healthcheck (every 30 s) finds the broker healthy
    def health():
        h = inspect(engine, cid, "{{json .State.Health}}")
        return h if h["Status"] != "starting" or any(r["ExitCode"] for r in h["Log"]) else None
    h = wait_for(health, 75, 1, what="a healthcheck result")
    assert h["Status"] == "healthy", h
    # uplinks taken while akenza is away are on disk in the volume: a restart keeps them, and
    # they arrive once akenza is back
    standin.stop()
    backlog = [f'{{"n":{i}}}'.encode() for i in range(20)]
    for p in backlog:
        s.publish(UP, p)                    # PUBACKed: in the spool
    s.close()
    restart()
    recovered = f": {len(backlog)} undelivered uplinks"
    wait_for(lambda: recovered in gw.logs(cid), 30, 0.5, what="the spool's backlog after the restart")
    spool = Path(mounts["/mosquitto/data"]["Source"], "akenza-spool")
    assert list(spool.glob("*.seg")), "the spool is not in the data volume"
    assert not set(backlog) & set(standin.uplinks(UP)), "uplinks went up while akenza was away"
    standin.start()
    wait_for(lambda: set(backlog) <= set(standin.uplinks(UP)), 60, 0.5, what="the backlog at the stand-in")
    firsts = [p for p in dict.fromkeys(standin.uplinks(UP)) if p in backlog]
    assert firsts == backlog, "the backlog arrived out of order"


# Every command of the README's Docker section, as the tests below find it (step()).
README_STEPS = ["docker build ", "cd docker && ", "sudo chown ", "docker run --rm ", "docker-compose up ",
                "docker-compose logs ", "docker run -d ", "docker logs "]


def test_every_readme_step_is_run():
    """A step added to the README is a step the tests must take: none goes unnoticed."""
    for s in readme_steps():
        assert any(s.startswith(p) for p in README_STEPS), f"README, Docker section: {s!r} is not tested"
    for p in README_STEPS:
        step(p)


def only_host_networks(engine):
    """The lane's own engine has no network but host and none: no container got an address."""
    if engine.own_pid is not None:
        names = engine.docker("network", "ls", "--format", "{{.Name}}", timeout=30).stdout.split()
        assert sorted(names) == ["host", "none"], names


def test_docker_run(engine, image, tmp_path, standin, pki):
    gw = Gateway(engine, tmp_path, standin, pki)
    check_keys(gw)
    name, volume = f"akz-test-{os.getpid()}", f"akz-test-{os.getpid()}-data"
    # the host network for the published port, names of this run's own
    run = step("docker run -d ", ("-p 1883:1883", f"--network host -e AKZ_HEALTH_PORT={gw.port}"),
               ("--name mosquitto-akenza", f"--name {name}"), ("-v mosquitto-data:", f"-v {volume}:"))
    try:
        cid = sh(engine, run, gw.dir).stdout.strip()
        only_host_networks(engine)
        logs = step("docker logs ", ("-f mosquitto-akenza", name))     # the log so far, not followed
        check_gateway(gw, cid, standin, lambda: engine.docker("restart", "-t", "30", cid, timeout=90),
                      lambda: output(sh(engine, logs, gw.dir, timeout=30)))
    finally:
        engine.docker("rm", "-f", name, check=False, timeout=90)
        engine.docker("volume", "rm", volume, check=False, timeout=60)


def test_docker_compose(engine, image, tmp_path, standin, pki):
    gw = Gateway(engine, tmp_path, standin, pki)
    check_keys(gw)
    # the host network instead of docker-compose.override.yml's published port, a project of this run's own
    compose = f"docker-compose -p akztest{os.getpid()} -f docker-compose.yml -f {HOST_OVERRIDE} "
    env = {"AKZ_HEALTH_PORT": str(gw.port)}
    try:
        sh(engine, step("docker-compose up ", ("docker-compose ", compose)), gw.dir, timeout=180, env=env)
        cid = sh(engine, compose + "ps -q mosquitto", gw.dir, env=env).stdout.strip()
        assert cid, "docker-compose started no container"
        only_host_networks(engine)
        assert inspect(engine, cid, "{{json .HostConfig.RestartPolicy.Name}}") == "unless-stopped"
        logs = step("docker-compose logs ", ("docker-compose ", compose), ("logs -f", "logs --no-color"))
        check_gateway(gw, cid, standin, lambda: sh(engine, compose + "restart -t 30", gw.dir, timeout=90, env=env),
                      lambda: output(sh(engine, logs, gw.dir, timeout=30, env=env)))
    finally:
        sh(engine, compose + "down -v -t 30", gw.dir, timeout=120, env=env)
