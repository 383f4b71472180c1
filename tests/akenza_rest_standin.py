# SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause
"""The akenza REST stand-in: the part of akenza's REST API that onboarding uses, as akenza's Java
client (akenza-io/akenza-java-client) calls it, over HTTPS with the test's CA.

    GET    /v3/devices/by-device-id?deviceId=<deviceId>             the device, or 404
    POST   /v3/devices                                              {name, deviceId, workspaceId, dataFlowId, connectivity}
    GET    /v3/devices/<id>
    GET    /v3/device-authorization/devices/<id>/credentials        a page: ?page=N&size=M
    POST   /v3/device-authorization/devices/<id>/credentials        {name, akenzaDeviceId, algorithm, publicKey, expiration}
    DELETE /v3/device-authorization/devices/<id>/credentials/<cid>  204

Every request needs `x-api-key` (401 without or with an unknown key; 403 when a read-only key
writes); every answer carries X-RateLimit-Limit/-Remaining/-Reset and 429 comes when a key's
window is used up; errors are JSON with a "message". Faults can be scripted (--faults 429x2,okx3,503:
the first requests get those answers, "ok" a real one). The credentials it holds are written where the MQTT
stand-in (tests/standin/standin_auth.c) reads them, <keys_dir>/<deviceId>~<credentialId>.cred.pem,
so that a key registered here is one the MQTT stand-in accepts and a deleted one is refused.

Run as a script (a real process, stopped by PID); RestStandin starts and reads one for a test."""
import argparse
import base64
import hashlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

ALGORITHMS = ("RSA256_PEM", "RSA256_X509_PEM", "EC256_PEM", "EC256_X509_PEM")


def now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def pem_der(text, label):
    """The DER inside a PEM block of `label`, or None."""
    m = re.search(rf"-----BEGIN {label}-----\s*(.*?)\s*-----END {label}-----", text, re.S)
    if not m:
        return None
    try:
        return base64.b64decode("".join(m.group(1).split()), validate=True)
    except ValueError:
        return None


class ApiError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


class State:
    """akenza's side: workspaces, data flows, devices, credentials. One lock; saved after every change."""

    def __init__(self, path, keys_dir, save_every_change=True):
        self.path, self.keys_dir = Path(path), Path(keys_dir)
        self.save_every_change = save_every_change
        self.lock = threading.Lock()
        doc = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.workspaces = doc.get("workspaces", ["2900000000000000"])
        # data flow id -> {"workspaceId", "deviceCredentials": whether its MQTT connector uses them}
        self.data_flows = doc.get("dataFlows", {"0800000000000005": {"workspaceId": "2900000000000000",
                                                                     "deviceCredentials": True}})
        self.devices = doc.get("devices", {})          # akenza id -> device
        self.credentials = doc.get("credentials", {})  # credential id -> credential
        self.next_id = doc.get("nextId", 0x0200000000000100)
        self.save()

    def new_id(self):
        self.next_id += 1
        return f"{self.next_id:016X}"

    def changed(self):
        if self.save_every_change:
            self.save()

    def save(self):
        doc = {"workspaces": self.workspaces, "dataFlows": self.data_flows, "devices": self.devices,
               "credentials": self.credentials, "nextId": self.next_id}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(self.path)

    def by_device_id(self, device_id):
        for d in self.devices.values():
            if d["deviceId"] == device_id:
                return d
        return None

    def device(self, akenza_id):
        d = self.devices.get(akenza_id)
        if d is None:
            raise ApiError(404, f"Device with id {akenza_id} not found")
        return d

    def create_device(self, body):
        for f in ("name", "deviceId", "workspaceId", "dataFlowId", "connectivity"):
            if not isinstance(body.get(f), str) or not body[f]:
                raise ApiError(400, f"{f} must not be empty")
        if body["workspaceId"] not in self.workspaces:
            raise ApiError(404, f"Workspace with id {body['workspaceId']} not found")
        flow = self.data_flows.get(body["dataFlowId"])
        if flow is None or flow["workspaceId"] != body["workspaceId"]:
            raise ApiError(404, f"Data flow with id {body['dataFlowId']} not found")
        if body["connectivity"] != "MQTT":
            raise ApiError(400, f"connectivity {body['connectivity']} does not match the data flow's MQTT connector")
        if not flow["deviceCredentials"]:
            raise ApiError(400, "the data flow's MQTT connector does not use device credentials")
        if self.by_device_id(body["deviceId"]):
            raise ApiError(400, f"a device with deviceId {body['deviceId']} already exists")
        d = {"id": self.new_id(), "name": body["name"], "description": body.get("description"), "type": "DEVICE",
             "workspaceId": body["workspaceId"], "organizationId": "2800000000000000", "deviceId": body["deviceId"],
             "connectivity": "MQTT", "dataFlowId": body["dataFlowId"], "customFields": [], "tags": [],
             "properties": {}, "created": now_iso(), "updated": now_iso()}
        self.devices[d["id"]] = d
        self.changed()
        return d

    def credentials_of(self, akenza_id):
        self.device(akenza_id)
        return sorted((c for c in self.credentials.values() if c["akenzaDeviceId"] == akenza_id),
                      key=lambda c: c["id"])

    def create_credential(self, akenza_id, body):
        d = self.device(akenza_id)
        if body.get("akenzaDeviceId") != akenza_id:
            raise ApiError(400, "akenzaDeviceId does not match the path")
        alg, key = body.get("algorithm"), body.get("publicKey")
        if alg not in ALGORITHMS:
            raise ApiError(400, f"algorithm must be one of {', '.join(ALGORITHMS)}")
        if not isinstance(key, str):
            raise ApiError(400, "publicKey must not be empty")
        fingerprint = check_public_key(alg, key, d["deviceId"])
        c = {"id": self.new_id(), "name": body.get("name"), "akenzaDeviceId": akenza_id, "deviceId": d["deviceId"],
             "algorithm": alg, "publicKey": key, "fingerprint": fingerprint,
             "expiration": body.get("expiration"), "created": now_iso(), "updated": now_iso()}
        self.credentials[c["id"]] = c
        self.write_key_file(c)
        self.changed()
        return c

    def delete_credential(self, akenza_id, cred_id):
        self.device(akenza_id)
        c = self.credentials.get(cred_id)
        if c is None or c["akenzaDeviceId"] != akenza_id:
            raise ApiError(404, f"Device credential with id {cred_id} not found")
        del self.credentials[cred_id]
        self.touch_keys_dir(lambda: self.key_file(c).unlink(missing_ok=True))
        self.changed()

    def key_file(self, c):
        return self.keys_dir / f"{c['deviceId']}~{c['id']}.cred.pem"

    def write_key_file(self, c):
        def write():
            tmp = self.keys_dir / f".{c['id']}.tmp"
            tmp.write_text(c["publicKey"])
            tmp.replace(self.key_file(c))
        self.touch_keys_dir(write)

    def touch_keys_dir(self, change):
        """Runs change() in the MQTT stand-in's key directory and makes sure the directory's mtime
        moved, which is how the MQTT stand-in notices (two changes in one tick of the kernel's
        clock would leave one mtime)."""
        before = self.keys_dir.stat().st_mtime_ns
        change()
        after = self.keys_dir.stat().st_mtime_ns
        if after == before:
            os.utime(self.keys_dir, ns=(after + 1, after + 1))


def check_public_key(alg, text, device_id):
    """Checks an uploaded credential as akenza would have to: the PEM form its algorithm names, a key
    of the right kind, and for certificates a valid self-signature and CN = deviceId. Returns the
    fingerprint (SHA-1 of the DER, as in the Java client's test data); raises ApiError(400)."""
    from Cryptodome.PublicKey import ECC, RSA
    x509 = alg.endswith("_X509_PEM")
    der = pem_der(text, "CERTIFICATE" if x509 else "PUBLIC KEY")
    if der is None:
        raise ApiError(400, f"publicKey is not a PEM {'certificate' if x509 else 'public key'} as {alg} requires")
    try:
        if alg.startswith("EC256"):
            k = ECC.import_key(text)
            if k.curve not in ("NIST P-256", "p256", "P-256", "prime256v1", "secp256r1"):
                raise ValueError("not P-256")
        else:
            k = RSA.import_key(text)
            if k.size_in_bits() < 2048:
                raise ValueError("RSA shorter than 2048 bits")
    except (ValueError, IndexError, TypeError) as e:
        raise ApiError(400, f"publicKey is not a valid {alg} key: {e}")
    if x509:
        with tempfile.NamedTemporaryFile("w", suffix=".pem") as f:
            f.write(text)
            f.flush()
            v = subprocess.run(["openssl", "verify", "-check_ss_sig", "-partial_chain", "-CAfile", f.name, f.name],
                               capture_output=True, text=True, timeout=30)
            subj = subprocess.run(["openssl", "x509", "-in", f.name, "-noout", "-subject", "-nameopt", "RFC2253"],
                                  capture_output=True, text=True, timeout=30)
        if v.returncode != 0:
            raise ApiError(400, "the certificate is not validly self-signed")
        if subj.stdout.strip() != f"subject=CN={device_id}":
            raise ApiError(400, f"the certificate's subject is not CN={device_id}")
    return hashlib.sha1(der).hexdigest()


class Limiter:
    """A fixed window of `limit` requests per `window` seconds for each API key, and a scripted list
    of faults for the first requests."""

    def __init__(self, limit, window, faults, epoch_reset):
        self.limit, self.window, self.epoch_reset = limit, window, epoch_reset
        self.faults = []   # the answers of the first requests: a status, or None for a real answer
        for part in filter(None, (faults or "").split(",")):
            status, _, count = part.partition("x")
            self.faults += [None if status == "ok" else int(status)] * int(count or 1)
        self.windows = {}
        self.lock = threading.Lock()

    def take(self, key):
        """Counts one request of key. Returns (the status to answer instead, or None; the headers).
        A scripted fault does not use up the window."""
        with self.lock:
            now = time.time()
            start, used = self.windows.get(key, (now, 0))
            if now - start >= self.window:
                start, used = now, 0
            fault = self.faults.pop(0) if self.faults else None
            if fault is None and used >= self.limit:
                fault = 429
            elif fault is None:
                used += 1
            self.windows[key] = (start, used)
            # A scripted 429 is a burst limit of one second; the window's own lasts until it ends.
            left = 1 if fault is not None and used < self.limit else max(1, int(start + self.window - now + 0.999))
            return fault, {"X-RateLimit-Limit": str(self.limit),
                           "X-RateLimit-Remaining": str(0 if fault == 429 else self.limit - used),
                           "X-RateLimit-Reset": str(int(now) + left if self.epoch_reset else left)}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, as the Java client's OkHttp uses it
    server_version = "akenza-rest-standin"

    def log_message(self, fmt, *args):
        pass

    def setup(self):
        super().setup()
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def answer(self, status, body=None, headers=None):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        # Logged before the answer leaves: a test that reads the log once the client is done
        # must find every request the client made.
        srv = self.server
        with srv.log_lock:
            srv.log.write(f"{self.command} {self.path} {status}\n")
            srv.log.flush()
        # Head and body in one write: two small writes meet the client's delayed ACK (40 ms each).
        self._headers_buffer.append(b"\r\n" + data)
        self.flush_headers()

    def handle_any(self):
        srv = self.server
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if srv.delay:
            time.sleep(srv.delay)
        key = self.headers.get("x-api-key")
        scope = srv.api_keys.get(key) if key else None
        if scope is None:
            return self.answer(401, {"message": "Unauthorized: a valid x-api-key header is required"})
        fault, rl = srv.limiter.take(key)
        if fault == 429:
            return self.answer(429, {"message": "Too Many Requests"}, rl)
        if fault:
            return self.answer(fault, {"message": f"scripted fault {fault}"}, rl)
        if self.command in ("POST", "DELETE", "PUT") and scope != "rw":
            return self.answer(403, {"message": "Forbidden: the API key may not change devices"}, rl)
        try:
            body = None
            if self.command == "POST":
                if not (self.headers.get("Content-Type") or "").startswith("application/json"):
                    raise ApiError(400, "Content-Type must be application/json")
                try:
                    body = json.loads(raw)
                except ValueError:
                    raise ApiError(400, "the body is not JSON")
                if not isinstance(body, dict):
                    raise ApiError(400, "the body must be a JSON object")
            status, out = self.route(body)
        except ApiError as e:
            status, out = e.status, {"message": e.message}
        self.answer(status, out, rl)

    def route(self, body):
        st = self.server.state
        url = urlsplit(self.path)
        q = parse_qs(url.query)
        p = url.path
        with st.lock:
            if p == "/v3/devices/by-device-id" and self.command == "GET":
                if "deviceId" not in q:
                    raise ApiError(400, "the deviceId query parameter is required")
                d = st.by_device_id(q["deviceId"][0])
                if d is None:
                    raise ApiError(404, f"Device with deviceId {q['deviceId'][0]} not found")
                return 200, d
            if p == "/v3/devices" and self.command == "POST":
                return 201, st.create_device(body)
            m = re.fullmatch(r"/v3/devices/([^/]+)", p)
            if m and self.command == "GET":
                return 200, st.device(m.group(1))
            m = re.fullmatch(r"/v3/device-authorization/devices/([^/]+)/credentials", p)
            if m and self.command == "GET":
                return 200, self.page(st.credentials_of(m.group(1)), q)
            if m and self.command == "POST":
                return 201, st.create_credential(m.group(1), body)
            m = re.fullmatch(r"/v3/device-authorization/devices/([^/]+)/credentials/([^/]+)", p)
            if m and self.command == "DELETE":
                st.delete_credential(m.group(1), m.group(2))
                return 204, None
        raise ApiError(404 if self.command in ("GET", "POST", "DELETE") else 405, f"No route for {self.command} {p}")

    def page(self, items, q):
        """A Spring page, as akenza answers lists: page is 0-based, size defaults to 20."""
        try:
            page, size = int(q.get("page", ["0"])[0]), int(q.get("size", [str(self.server.page_size)])[0])
        except ValueError:
            raise ApiError(400, "page and size must be numbers")
        if page < 0 or not 1 <= size <= 100:
            raise ApiError(400, "page must be >= 0 and size 1..100")
        size = min(size, self.server.max_page_size)   # as Spring caps a page
        chunk = items[page * size:(page + 1) * size]
        pages = (len(items) + size - 1) // size
        return {"content": chunk, "totalElements": len(items), "totalPages": pages, "last": page >= pages - 1,
                "size": size, "number": page, "numberOfElements": len(chunk), "first": page == 0,
                "empty": not chunk}

    do_GET = do_POST = do_DELETE = do_PUT = handle_any


class RestStandin:
    """Runs the stand-in as a process for a test: TLS with the test PKI's localhost certificate,
    one read-write API key (self.api_key) and one read-only (self.ro_key), credentials written to
    keys_dir (the MQTT stand-in's). devices: deviceIds akenza knows already. Stop it with stop()."""

    def __init__(self, workdir, pki, keys_dir, devices=(), **opts):
        from conftest import wait_for
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cafile = pki.ca_cert
        self.api_key = "akz-" + os.urandom(12).hex()
        self.ro_key = "akz-ro-" + os.urandom(8).hex()
        keys = self.dir / "api-keys"
        keys.write_text(f"{self.api_key} rw\n{self.ro_key} ro\n")
        self.state_file, self.log_file = self.dir / "state.json", self.dir / "requests.log"
        if devices:
            st = State(self.state_file, keys_dir)
            for dev in devices:
                st.create_device({"name": dev, "deviceId": dev, "workspaceId": st.workspaces[0],
                                  "dataFlowId": next(iter(st.data_flows)), "connectivity": "MQTT"})
        args = ["--port", "0", "--cert", pki.server_cert, "--key", pki.server_key, "--api-keys", keys,
                "--keys-dir", keys_dir, "--state", self.state_file, "--log", self.log_file]
        for k, v in opts.items():
            args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [v])
        self.out = open(self.dir / "stdout", "ab")
        self.proc = subprocess.Popen(["/usr/bin/python3", __file__, *map(str, args)], stdout=self.out,
                                     stderr=subprocess.STDOUT)

        def up():
            out = (self.dir / "stdout").read_text()
            assert self.proc.poll() is None, out
            return out.startswith("ready ") and out.endswith("\n") and int(out.split()[1])
        # It binds a port of its own choosing and names it: no other process can take it meanwhile.
        self.port = wait_for(up, 20, what="the REST stand-in to start")
        self.url = f"https://localhost:{self.port}"

    def state(self):
        return json.loads(self.state_file.read_text())

    def device(self, device_id):
        return next((d for d in self.state()["devices"].values() if d["deviceId"] == device_id), None)

    def credentials(self, device_id):
        return [c for c in self.state()["credentials"].values() if c["deviceId"] == device_id]

    def requests(self):
        """[(method, path, status)] of every request so far."""
        if not self.log_file.exists():
            return []
        return [tuple(l.rsplit(" ", 2)[:2]) + (int(l.rsplit(" ", 1)[1]),)
                for l in self.log_file.read_text().splitlines()]

    def stop(self):
        from conftest import stop_process   # the suite's helper; the stand-in itself runs without it
        stop_process(self.proc)
        self.out.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True, help="0: any free port (printed)")
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--api-keys", required=True, help="file of lines 'KEY rw|ro'")
    ap.add_argument("--keys-dir", required=True)
    ap.add_argument("--state", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--rate-limit", type=int, default=100000)
    ap.add_argument("--rate-window", type=float, default=60)
    ap.add_argument("--epoch-reset", action="store_true", help="X-RateLimit-Reset as a Unix time, not seconds left")
    ap.add_argument("--faults", default="")
    ap.add_argument("--page-size", type=int, default=20, help="of a list asked for without a size")
    ap.add_argument("--max-page-size", type=int, default=100, help="the largest page answered, whatever was asked")
    ap.add_argument("--delay-ms", type=float, default=0, help="added to every answer, as a WAN would")
    ap.add_argument("--save-at-exit", action="store_true",
                    help="write the state file at exit only (benchmarks: every change rewrites the whole file)")
    a = ap.parse_args()
    keys = {}
    for line in Path(a.api_keys).read_text().splitlines():
        if line.strip():
            k, scope = line.split()
            keys[k] = scope
    srv = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    srv.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    srv.api_keys, srv.page_size, srv.delay = keys, a.page_size, a.delay_ms / 1000
    srv.max_page_size = a.max_page_size
    srv.state = State(a.state, a.keys_dir, save_every_change=not a.save_at_exit)
    srv.limiter = Limiter(a.rate_limit, a.rate_window, a.faults, a.epoch_reset)
    srv.log = open(a.log, "a")
    srv.log_lock = threading.Lock()
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=srv.shutdown).start())
    print(f"ready {srv.server_address[1]}", flush=True)
    srv.serve_forever()
    with srv.state.lock:
        srv.state.save()
    srv.log.close()


if __name__ == "__main__":
    sys.exit(main())
