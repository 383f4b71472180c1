# SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause
"""The container lane's engine and base image: a Docker engine to talk to (one that answers, else
Debian's dockerd started here with its own data root, sockets and no networks of its own), and a
debian:12-slim base image made with debootstrap and `docker import` when the engine has none (no
image registry needs to be reachable, only the Debian mirror apt already uses)."""
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from conftest import wait_for

DOCKER = "/usr/bin/docker"          # Debian's CLI (docker.io), the engine's own version
DOCKERD = "/usr/sbin/dockerd"
BASE_IMAGE = "debian:12-slim"
SUITE = "bookworm"


def docker_cmd(host, *args, timeout=120, check=True, **kw):
    """Runs the docker CLI against host; CompletedProcess with text output. Fails (check) with the
    command and its stderr in the message."""
    r = subprocess.run([DOCKER, "-H", host, *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: exit {r.returncode}\n{r.stdout[-2000:]}{r.stderr[-4000:]}")
    return r


def answers(host):
    """True if a Docker engine answers on host within 10 s."""
    try:
        return docker_cmd(host, "version", "--format", "{{.Server.Version}}", timeout=10, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


class Engine:
    """A Docker engine for the lane. start(): the one at $DOCKER_HOST or the default socket if it
    answers, else dockerd started here (state in dir: data root, exec root, socket, pidfile, log;
    --bridge=none --iptables=false, so its containers use the host network only). stop() stops
    only a dockerd this object started (or found left over at its own socket), by its PID."""

    def __init__(self, state_dir):
        self.dir = Path(state_dir)
        self.host = None
        self.own_pid = None

    def start(self, timeout=90):
        for host in (os.environ.get("DOCKER_HOST"), "unix:///var/run/docker.sock"):
            if host and answers(host):
                self.host = host
                return self
        self.dir.mkdir(parents=True, exist_ok=True)
        sock, pidfile = self.dir / "docker.sock", self.dir / "dockerd.pid"
        self.host = f"unix://{sock}"
        if len(str(sock)) > 100:
            raise AssertionError(f"{sock}: the path is too long for a unix socket; use a shorter BUILD")
        if answers(self.host):      # left running by an interrupted run of this lane: ours to stop
            self.own_pid = int(pidfile.read_text())
            return self
        config = self.dir / "daemon.json"
        config.write_text("{}\n")   # not /etc/docker/daemon.json: a host engine's settings are not ours
        log = open(self.dir / "dockerd.log", "ab")
        proc = subprocess.Popen([DOCKERD, "--config-file", str(config), "--data-root", str(self.dir / "root"),
                                 "--exec-root", str(self.dir / "exec"), "--pidfile", str(pidfile),
                                 "-H", self.host, "--bridge=none", "--iptables=false", "--ip6tables=false",
                                 "--ip-masq=false"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.own_pid = proc.pid

        def up():
            if proc.poll() is not None:
                raise AssertionError(f"dockerd exited with {proc.returncode}:\n{self.log()[-3000:]}")
            return answers(self.host)
        try:
            wait_for(up, timeout, 0.5, what=f"dockerd to answer on {sock}")
        except AssertionError:
            self.stop()
            raise
        return self

    def log(self):
        f = self.dir / "dockerd.log"
        return f.read_text(errors="replace") if f.exists() else ""

    def stop(self, timeout=60):
        """Stops the dockerd this engine started: SIGTERM (it stops its containers and containerd),
        SIGKILL after timeout seconds; then unmounts what it left mounted in its state directory
        (the namespace file of its network controller), so that `make clean` can remove it."""
        pid, self.own_pid = self.own_pid, None
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pid = None
        deadline = time.monotonic() + timeout
        while pid is not None:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break
            except ChildProcessError:   # not our child (adopted): poll for its exit
                if not Path(f"/proc/{pid}").exists():
                    break
            if time.monotonic() > deadline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + 10
            time.sleep(0.2)
        unmount_under(self.dir)

    def docker(self, *args, **kw):
        return docker_cmd(self.host, *args, **kw)

    def env(self):
        """The environment for docker and docker-compose commands run against this engine."""
        return dict(os.environ, DOCKER_HOST=self.host)

    def has_image(self, ref):
        return self.docker("image", "inspect", ref, check=False, timeout=30).returncode == 0


def unmount_under(path):
    """Unmounts every mount below path, the deepest first."""
    prefix = str(Path(path).resolve()) + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
        if point.startswith(prefix):
            points.append(point)
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", point], check=True, timeout=30)


def host_mirrors():
    """The Debian archive URIs apt uses on this host: (main, security). Defaults: deb.debian.org."""
    main, security = "http://deb.debian.org/debian", "http://deb.debian.org/debian-security"
    texts = [p.read_text() for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
             if p.is_file()]
    for text in texts:
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites:
                pairs = [(uris.group(1), s) for s in suites.group(1).split()]
            else:
                pairs = [(m.group(1), m.group(2)) for m in
                         re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", stanza, re.M)]
            for uri, suite in pairs:
                if suite == SUITE:
                    main = uri
                elif suite == f"{SUITE}-security":
                    security = uri
    return main.rstrip("/"), security.rstrip("/")


def host_apt_options():
    """apt settings of this host a container's apt needs to reach the same mirror: proxies and the
    checks a snapshot mirror's old Release files would fail (Check-Valid-Until, Check-Date)."""
    r = subprocess.run(["apt-config", "dump"], capture_output=True, text=True, timeout=30, check=True)
    keep = re.compile(r'^Acquire::(Check-Valid-Until|Check-Date|https?::Proxy(::[^ ]+)?) ')
    return "".join(line + "\n" for line in r.stdout.splitlines() if keep.match(line))


# What the official Debian images (debuerreotype) set up for apt and dpkg inside containers; the
# dpkg excludes are those of the -slim variant.
CONTAINER_FILES = {
    "usr/sbin/policy-rc.d": "#!/bin/sh\n# no services are started in image builds\nexit 101\n",
    "etc/apt/apt.conf.d/docker-clean": 'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
                                       '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
                                       'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
                                       '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
                                       'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";\n',
    "etc/apt/apt.conf.d/docker-gzip-indexes": 'Acquire::GzipIndexes "true";\n',
    "etc/apt/apt.conf.d/docker-no-languages": 'Acquire::Languages "none";\n',
    "etc/apt/apt.conf.d/docker-autoremove-suggests": 'Apt::AutoRemove::SuggestsImportant "false";\n',
    "etc/dpkg/dpkg.cfg.d/docker": "force-unsafe-io\n",
    "etc/dpkg/dpkg.cfg.d/docker-slim": "path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\n"
                                       "path-exclude /usr/share/man/*\npath-exclude /usr/share/info/*\n"
                                       "path-exclude /usr/share/locale/*\npath-include /usr/share/locale/locale.alias\n"
                                       "path-exclude /usr/share/groff/*\npath-exclude /usr/share/lintian/*\n"
                                       "path-exclude /usr/share/linda/*\n",
}


def make_base_image(engine, workdir, tag=BASE_IMAGE, timeout=900):
    """Makes tag in engine from a debootstrap --variant=minbase of Debian 12 off this host's mirror,
    shaped like the official -slim image; the rootfs is built in workdir (replaced)."""
    workdir = Path(workdir)
    rootfs = workdir / "rootfs"
    subprocess.run(["rm", "-rf", str(rootfs)], check=True, timeout=300)
    workdir.mkdir(parents=True, exist_ok=True)
    main, security = host_mirrors()
    log = workdir / "debootstrap.log"
    with open(log, "wb") as out:
        r = subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(rootfs), main],
                           stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"debootstrap from {main}: exit {r.returncode}\n{log.read_text()[-3000:]}")
    (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
    (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(
        f"Types: deb\nURIs: {main}\nSuites: {SUITE} {SUITE}-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        f"Types: deb\nURIs: {security}\nSuites: {SUITE}-security\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    (rootfs / "etc/apt/apt.conf.d/99host").write_text(host_apt_options())
    for rel, text in CONTAINER_FILES.items():
        (rootfs / rel).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / rel).write_text(text)
    os.chmod(rootfs / "usr/sbin/policy-rc.d", 0o755)
    # as the -slim image ships: no package caches or lists, no docs but copyrights, no man pages or locales
    subprocess.run(["sh", "-c", "cd '%s' && rm -rf var/cache/apt/archives/*.deb var/lib/apt/lists/* "
                    "usr/share/man/* usr/share/info/* usr/share/groff/* usr/share/lintian/* "
                    "&& find usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete "
                    "&& find usr/share/locale -mindepth 1 -maxdepth 1 -not -name locale.alias "
                    "-exec rm -rf {} +" % rootfs], check=True, timeout=300)
    tar = subprocess.Popen(["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-c", "."],
                           stdout=subprocess.PIPE)
    try:
        r = subprocess.run([DOCKER, "-H", engine.host, "import", "--change", 'CMD ["bash"]', "-", tag],
                           stdin=tar.stdout, capture_output=True, text=True, timeout=600)
    finally:
        tar.stdout.close()
        tar.wait(60)
    if r.returncode != 0 or tar.returncode != 0:
        raise AssertionError(f"docker import {tag}: exit {r.returncode} (tar {tar.returncode})\n{r.stderr[-3000:]}")
    subprocess.run(["rm", "-rf", str(rootfs)], check=True, timeout=300)


def inspect(engine, ref, fmt="{{json .}}"):
    """docker inspect of a container or image, parsed from JSON."""
    return json.loads(engine.docker("inspect", "--format", fmt, ref, timeout=30).stdout)
