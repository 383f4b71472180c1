# SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause
"""A software TPM 2.0 (swtpm, the real TPM command set over a socket) for the tests and the benchmarks:
its own state directory, free ports on 127.0.0.1, stopped by PID."""
import os
import signal
import socket
import subprocess
from pathlib import Path

from conftest import AKENZACTL, free_port, run, stop_process, wait_for


def free_port_pair():
    """Two free TCP ports p, p+1 on 127.0.0.1: the swtpm TCTI finds the control channel at p+1."""
    for _ in range(100):
        p = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
            return p, p + 1
        except OSError:
            continue
    raise AssertionError("no two consecutive free ports")


class Swtpm:
    """Starts at construction. stop()/start() keep the state (the TPM's keys) and the ports;
    pause()/resume() make it stop answering without closing its socket (SIGSTOP/SIGCONT)."""

    def __init__(self, workdir):
        self.dir = Path(workdir).resolve()
        self.state = self.dir / "state"
        self.state.mkdir(parents=True, exist_ok=True)
        self.port, self.ctrl = free_port_pair()
        self.proc = None
        self.start()

    @property
    def tcti(self):
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def env(self):
        """What a process needs in its environment to reach this TPM through the tpm2 provider and
        tpm2-tools (TSS2_LOG: the TSS library prints its errors on stderr otherwise)."""
        return {"TPM2OPENSSL_TCTI": self.tcti, "TPM2TOOLS_TCTI": self.tcti, "TSS2_LOG": "all+none"}

    def start(self):
        # The state path must be absolute: swtpm fails to store it (and enters failure mode) otherwise.
        self.log = open(self.dir / "swtpm.log", "ab")
        self.proc = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state}",
             "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
             "--ctrl", f"type=tcp,port={self.ctrl},bindaddr=127.0.0.1",
             "--flags", "not-need-init,startup-clear"],
            stdout=self.log, stderr=subprocess.STDOUT)

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"swtpm exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                return False
        wait_for(up, 10, what="swtpm to listen")

    def pause(self):
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)   # a paused TPM would not hear SIGTERM
            stop_process(self.proc)
        if self.log:
            self.log.close()
            self.log = None

    def tool(self, *args, check=True):
        """Runs a tpm2-tools command against this TPM; flushes what it left loaded (no resource
        manager in front of swtpm: a TPM has room for three loaded objects)."""
        env = dict(os.environ, **self.env())
        r = run(list(args), check=check, env=env, cwd=self.dir)
        run(["tpm2_flushcontext", "-t"], env=env, cwd=self.dir)
        return r

    def persistent_key(self, handle, kind="ecc256:ecdsa"):
        """Makes a signing key in the TPM and makes it persistent at handle (e.g. 0x81000001)."""
        self.tool("tpm2_createprimary", "-C", "o", "-g", "sha256", "-G", "ecc", "-c", "primary.ctx")
        self.tool("tpm2_create", "-C", "primary.ctx", "-G", kind, "-c", f"key{handle}.ctx")
        self.tool("tpm2_evictcontrol", "-C", "o", "-c", f"key{handle}.ctx", handle)
        return f"handle:{handle}"

    def evict(self, handle):
        self.tool("tpm2_evictcontrol", "-C", "o", "-c", handle)

    def public_pem(self, handle, out):
        self.tool("tpm2_readpublic", "-c", handle, "-f", "pem", "-o", str(out))
        return out

    def keygen(self, keydir, device_id, kind="ec", extra=()):
        """akenzactl keygen --store tpm2: keydir/<id>.pem (the TPM's blob) and <id>.pub.pem; returns the kid."""
        env = dict(os.environ, **self.env())
        r = run([AKENZACTL, "keygen", "--device", device_id, "--type", kind, "--out", str(keydir),
                 "--store", "tpm2", *extra], env=env)
        return r.stdout.strip()
