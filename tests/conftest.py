# SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause
"""Shared fixtures: free ports, a test PKI made with openssl, real Mosquitto brokers."""
import functools
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD = Path(os.environ.get("AKZ_BUILD", ROOT / "build"))
PLUGIN = BUILD / "mosquitto_akenza.so"
STANDIN = BUILD / "standin_auth.so"
AKENZACTL = BUILD / "akenzactl"
# akenza's reference client and notes: beside the checkout, or where AKZ_SHARED says (a worktree).
SHARED = Path(os.environ.get("AKZ_SHARED", ROOT.parent / "shared"))
# The Mosquitto under test: Debian's by default. Another build (e.g. 2.1 from source) is chosen with
#   AKZ_MOSQUITTO      its broker binary
#   AKZ_MOSQUITTO_LIB  the directory of its libmosquitto (put first on LD_LIBRARY_PATH)
#   AKZ_MOSQUITTO_BIN  the directory of its mosquitto_passwd, mosquitto_ctrl ... (first on PATH;
#                      default: ../bin beside the broker's directory, when it holds mosquitto_passwd)
# They go into this process's environment, so every broker and tool the tests start (akenzactl
# and the benchmarks' programs included) runs with that build's library and tools.
MOSQUITTO = os.environ.get("AKZ_MOSQUITTO", "/usr/sbin/mosquitto")


def _use_mosquitto_build():
    lib = os.environ.get("AKZ_MOSQUITTO_LIB")
    if lib:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (lib, os.environ.get("LD_LIBRARY_PATH")) if p)
    tools = os.environ.get("AKZ_MOSQUITTO_BIN")
    if tools is None and "AKZ_MOSQUITTO" in os.environ:
        beside = Path(MOSQUITTO).resolve().parent.parent / "bin"
        tools = str(beside) if (beside / "mosquitto_passwd").exists() else None
    if tools:
        os.environ["PATH"] = os.pathsep.join([tools, os.environ.get("PATH", "")])


_use_mosquitto_build()


@functools.lru_cache(maxsize=None)
def mosquitto_version():
    """The broker's version as a tuple of ints, e.g. (2, 0, 11), from `mosquitto -h`."""
    out = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, timeout=30).stdout
    for word in out.split():
        parts = word.split(".")
        if len(parts) == 3 and all(x.isdigit() for x in parts):
            return tuple(int(x) for x in parts)
    raise AssertionError(f"cannot tell the version of {MOSQUITTO}:\n{out}")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def mosquitto_plugin(name):
    """The path of one of Mosquitto's own plugins (e.g. mosquitto_dynamic_security.so) from the
    build under test: beside its libmosquitto, else Debian's."""
    lib = os.environ.get("AKZ_MOSQUITTO_LIB")
    if lib and (Path(lib) / name).exists():
        return str(Path(lib) / name)
    return f"/usr/lib/x86_64-linux-gnu/{name}"


def disconnects(log, client_id, clean=True):
    """How many times a broker's log says client_id's connection ended with a DISCONNECT of its
    own (clean) or closed without one. 2.0 logs "Client <id> disconnected." and "Client <id>
    closed its connection.", 2.1 "Client <id> [<address>:<port>] disconnected." and "...
    disconnected: connection closed by client."."""
    cid = re.escape(client_id)
    if clean:
        line = re.compile(rf"Client {cid}(?: \[[^\]]*\])? disconnected\.$")
    else:
        line = re.compile(rf"Client {cid}(?: closed its connection\.| \[[^\]]*\] disconnected: connection closed by client\.)$")
    return sum(1 for x in log.splitlines() if line.search(x))


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    """utime + stime of a process (all its threads), in seconds, from /proc."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid):
    """Resident memory of a process in KiB (VmRSS), 0 if unknown."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def stop_process(proc, timeout=10.0):
    """Ends proc, a process the suite started: SIGTERM, then SIGKILL if it is still there after
    timeout seconds. Does nothing to one that has exited."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def wait_for(pred, timeout=10.0, interval=0.05, what="condition"):
    """Polls pred() until it returns a true value (returned) or the timeout passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def run(cmd, check=True, **kw):
    """Runs a command, returns CompletedProcess with text output."""
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=kw.pop("timeout", 120), **kw)


class PKI:
    """A throwaway CA and certificates, made with the openssl command line."""

    def __init__(self, d: Path):
        self.dir = d
        d.mkdir(parents=True, exist_ok=True)
        self.ca_key, self.ca_cert = self._ca("ca", "akenza-test CA")
        self.server_key, self.server_cert = self.server("server", "localhost", ["DNS:localhost", "IP:127.0.0.1"])

    def _ca(self, name, cn):
        key, cert = self.dir / f"{name}.key", self.dir / f"{name}.crt"
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", cert, "-days", "30", "-subj", f"/CN={cn}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        return key, cert

    def server(self, name, cn, sans, ca=None):
        """A server certificate for cn/sans, signed by ca (a (key, cert) pair; default: this CA)."""
        ca_key, ca_cert = ca or (self.ca_key, self.ca_cert)
        key, csr, cert = self.dir / f"{name}.key", self.dir / f"{name}.csr", self.dir / f"{name}.crt"
        ext = self.dir / f"{name}.ext"
        ext.write_text(f"subjectAltName={','.join(sans)}\nextendedKeyUsage=serverAuth\n")
        run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", csr, "-subj", f"/CN={cn}"])
        run(["openssl", "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
             "-out", cert, "-days", "30", "-extfile", ext])
        return key, cert

    def other_ca(self, name="rogue"):
        return self._ca(name, f"{name} CA")


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"))


class Broker:
    """A real mosquitto process started from a config text; stopped by PID at teardown."""

    def __init__(self, d: Path, conf: str, port: int, name="broker", expect_start=True, timeout=15,
                 wrapper=None, stop_timeout=10, env=None):
        """wrapper: a command to run mosquitto under (e.g. valgrind ...), as a list; default: the
        words of env AKZ_BROKER_WRAPPER, if set. The wrapper must exec the broker in the same
        process (as valgrind does) so that signals sent to proc.pid reach it. env: variables
        added to the broker's environment (an LD_PRELOAD goes after a sanitizer runtime's)."""
        self.dir, self.port, self.name = d, port, name
        self.env = dict(env or {})
        self.wrapper = list(wrapper) if wrapper is not None else shlex.split(os.environ.get("AKZ_BROKER_WRAPPER", ""))
        self.stop_timeout = stop_timeout
        d.mkdir(parents=True, exist_ok=True)
        self.logfile = d / f"{name}.log"
        self.conffile = d / f"{name}.conf"
        # Tests read debug lines; the benchmarks log as a deployed broker does (AKZ_LOG_TYPES).
        types = os.environ.get("AKZ_LOG_TYPES", "all").split()
        logs = "".join(f"log_type {t}\n" for t in types)
        self.conffile.write_text(conf + f"\nlog_dest file {self.logfile}\n{logs}user root\n")
        self.proc = None
        self.start(expect_start, timeout)

    def start(self, expect_start=True, timeout=15):
        self.logfile.touch()
        self.stdout = open(self.dir / f"{self.name}.stdout", "ab")
        env = dict(os.environ)
        env.update(self.env)
        if os.environ.get("AKZ_BROKER_PRELOAD"):
            # a sanitizer runtime for a plugin built with SAN=1 (make san-integration): first
            env["LD_PRELOAD"] = " ".join([os.environ["AKZ_BROKER_PRELOAD"]] +
                                         ([self.env["LD_PRELOAD"]] if "LD_PRELOAD" in self.env else []))
        self.proc = subprocess.Popen(self.wrapper + [MOSQUITTO, "-c", str(self.conffile)], stdout=self.stdout,
                                     stderr=subprocess.STDOUT, env=env)
        if not expect_start:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.stop()
                raise AssertionError(f"{self.name} started although it should not have:\n{self.log()}")
            return

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                return False
        try:
            wait_for(up, timeout, what=f"{self.name} to listen on {self.port}")
        except AssertionError:
            self.kill()   # hung at start: nobody holds this Broker to stop it at teardown
            raise

    def log(self):
        text = self.logfile.read_text(errors="replace") if self.logfile.exists() else ""
        out = self.dir / f"{self.name}.stdout"
        if out.exists():
            text += out.read_text(errors="replace")
        return text

    def wait_log(self, needle, timeout=10.0):
        return wait_for(lambda: needle in self.log(), timeout, what=f"'{needle}' in {self.name} log")

    def sighup(self):
        # The listener opens before the broker sets up its SIGHUP handler, and a SIGHUP in
        # between ends the broker: wait for the line it logs once the handler is there.
        wait_for(lambda: re.search(r"mosquitto version \S+ running", self.log()), 10,
                 what=f"{self.name} running")
        self.proc.send_signal(signal.SIGHUP)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self):
        stop_process(self.proc, self.stop_timeout)
        if getattr(self, "stdout", None):
            self.stdout.close()
            self.stdout = None
        if os.environ.get("AKZ_BROKER_PRELOAD"):
            out = (self.dir / f"{self.name}.stdout").read_text(errors="replace")
            for needle in ("ERROR: AddressSanitizer", "runtime error:", "WARNING: ThreadSanitizer"):
                assert needle not in out, f"{self.name}: sanitizer report:\n{out[-4000:]}"


@pytest.fixture
def brokers(tmp_path):
    """Factory: brokers(conf_text, port=None, name=...) -> Broker; all are stopped at teardown."""
    started = []

    def make(conf, port=None, name="broker", **kw):
        b = Broker(tmp_path / name, conf, port, name, **kw)
        started.append(b)
        return b
    yield make
    for b in started:
        b.stop()


@pytest.fixture
def standin_factory(tmp_path, pki):
    """Factory: standin_factory(cert=..., key=..., name=...) -> a started akenza stand-in."""
    from akenza_standin import Standin
    started = []

    def make(**kw):
        name = kw.setdefault("name", "standin")
        s = Standin(tmp_path / name, pki, **kw)
        started.append(s)
        return s
    yield make
    for s in started:
        s.stop()


@pytest.fixture
def standin(standin_factory):
    """A started akenza stand-in with the test CA's certificate for localhost."""
    return standin_factory()
