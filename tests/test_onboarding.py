# SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause
"""Onboarding a fleet: private-cloud audiences, self-signed certificates, and akenzactl akenza
against the REST stand-in (tests/akenza_rest_standin.py), whose credentials the MQTT stand-in
(tests/standin/) then trusts."""
import json
import subprocess

import jwt
import pytest

from conftest import AKENZACTL, wait_for
from edge import Edge


def ctl(*args, env=None, input=None, timeout=120):
    return subprocess.run([str(AKENZACTL), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env, input=input)


def up(device_id):
    return f"/up/device/id/{device_id}"


# ---- private clouds: plugin_opt_audience, akenzactl token --audience ---------------------------

def test_token_audience_option_is_what_pyjwt_verifies(tmp_path):
    assert ctl("keygen", "--device", "dev-a", "--type", "ec", "--out", tmp_path).returncode == 0
    pub = (tmp_path / "dev-a.pub.pem").read_text()
    tok = ctl("token", "--device", "dev-a", "--key", tmp_path / "dev-a.pem", "--audience", "acme.akenza.io")
    assert tok.returncode == 0, tok.stderr
    claims = jwt.decode(tok.stdout.strip(), pub, algorithms=["ES256"], audience="https://acme.akenza.io/devices/dev-a")
    assert claims["aud"] == "https://acme.akenza.io/devices/dev-a"
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(tok.stdout.strip(), pub, algorithms=["ES256"], audience="https://akenza.io/devices/dev-a")
    # without the option: akenza's public cloud
    tok = ctl("token", "--device", "dev-a", "--key", tmp_path / "dev-a.pem").stdout.strip()
    assert jwt.decode(tok, pub, algorithms=["ES256"], audience="https://akenza.io/devices/dev-a")
    for bad in ("acme.akenza.io/x", "", "-acme", 'a"b'):
        r = ctl("token", "--device", "dev-a", "--key", tmp_path / "dev-a.pem", "--audience", bad)
        assert r.returncode == 2 and "--audience" in r.stderr, bad


def test_private_cloud_accepts_its_audience_and_refuses_the_default(brokers, tmp_path, pki, standin_factory):
    private = standin_factory(name="private", audience="acme.akenza.io")
    for name, extra in (("ours", "plugin_opt_audience acme.akenza.io\n"), ("default", "")):
        e = Edge(brokers, tmp_path / f"edge-{name}", private.port, pki.ca_cert, extra=extra)
        dev = f"dev-{name}"
        private.register(dev, e.add_device(dev))
        e.start()
        admin = e.admin()
        if name == "ours":
            e.wait_state(admin, dev, "connected")
            e.sensor(dev).publish(up(dev), b'{"t":1}')
            wait_for(lambda: private.uplinks(up(dev)) == [b'{"t":1}'], 10, what="the uplink in the private cloud")
        else:
            e.wait_state(admin, dev, "unauthorized")
            private.wait_log(f"refused client '{dev}': aud mismatch")
        e.broker.stop()


def test_malformed_audience_stops_the_broker(brokers, tmp_path, pki, standin):
    e = Edge(brokers, tmp_path / "edge", standin.port, pki.ca_cert, extra="plugin_opt_audience https://acme.akenza.io\n")
    e.add_device("dev-x")
    b = e.start(expect_start=False)
    assert "plugin_opt_audience: 'https://acme.akenza.io' may hold only letters" in b.log()


# ---- self-signed certificates: keygen --cert, createDevice/rotateKey answers -----------------

def openssl(*args, input=None):
    r = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, input=input, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def check_certificate(cert_pem, device_id, public_pem, days, tmp_path):
    """The certificate names the device, holds its public key, is signed by that key (openssl verify
    with the certificate as its own trust anchor) and is valid for `days`."""
    f = tmp_path / f"check-{device_id}.crt"
    f.write_text(cert_pem)
    assert openssl("x509", "-in", f, "-noout", "-subject", "-nameopt", "RFC2253").strip() == f"subject=CN={device_id}"
    assert openssl("x509", "-in", f, "-noout", "-issuer", "-nameopt", "RFC2253").strip() == f"issuer=CN={device_id}"
    assert openssl("x509", "-in", f, "-noout", "-pubkey") == openssl("pkey", "-pubin", "-in", "/dev/stdin", input=public_pem)
    assert openssl("verify", "-check_ss_sig", "-partial_chain", "-CAfile", f, f).strip() == f"{f}: OK"
    text = openssl("x509", "-in", f, "-noout", "-text")
    assert "CA:FALSE" in text and "Digital Signature" in text
    import datetime
    dates = dict(l.split("=", 1) for l in openssl("x509", "-in", f, "-noout", "-startdate", "-enddate").splitlines())
    fmt = "%b %d %H:%M:%S %Y %Z"
    span = datetime.datetime.strptime(dates["notAfter"], fmt) - datetime.datetime.strptime(dates["notBefore"], fmt)
    assert span == datetime.timedelta(days=days)


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_keygen_cert_is_a_self_signed_certificate_of_the_key(tmp_path, kind):
    r = ctl("keygen", "--device", "0A1FFFFFFFFFFF", "--type", kind, "--out", tmp_path, "--cert", "--days", "400")
    assert r.returncode == 0, r.stderr
    cert = tmp_path / "0A1FFFFFFFFFFF.cert.pem"
    assert oct(cert.stat().st_mode & 0o777) == "0o644"
    pub = (tmp_path / "0A1FFFFFFFFFFF.pub.pem").read_text()
    check_certificate(cert.read_text(), "0A1FFFFFFFFFFF", pub, 400, tmp_path)
    # a token of the key verifies with the certificate's public key
    alg = "ES256" if kind == "ec" else "RS256"
    tok = ctl("token", "--device", "0A1FFFFFFFFFFF", "--key", tmp_path / "0A1FFFFFFFFFFF.pem").stdout.strip()
    cert_pub = openssl("x509", "-in", cert, "-noout", "-pubkey")
    assert jwt.decode(tok, cert_pub, algorithms=[alg], audience="https://akenza.io/devices/0A1FFFFFFFFFFF")
    # the default validity, and nothing is overwritten or half written
    assert ctl("keygen", "--device", "d2", "--type", kind, "--out", tmp_path, "--cert").returncode == 0
    check_certificate((tmp_path / "d2.cert.pem").read_text(), "d2", (tmp_path / "d2.pub.pem").read_text(), 3650, tmp_path)
    (tmp_path / "d3.cert.pem").write_text("someone's")
    r = ctl("keygen", "--device", "d3", "--type", kind, "--out", tmp_path, "--cert")
    assert r.returncode == 1 and "d3.cert.pem" in r.stderr
    assert not (tmp_path / "d3.pem").exists() and (tmp_path / "d3.cert.pem").read_text() == "someone's"
    r = ctl("keygen", "--device", "x" * 65, "--type", kind, "--out", tmp_path, "--cert")
    assert r.returncode == 1 and "common name" in r.stderr and not (tmp_path / ("x" * 65 + ".pem")).exists()
    for bad in (["--days", "0"], ["--days", "36501"], ["--days", "x"]):
        assert ctl("keygen", "--device", "d4", "--type", kind, "--out", tmp_path, "--cert", *bad).returncode == 2
    assert ctl("keygen", "--device", "d4", "--type", kind, "--out", tmp_path, "--days", "5").returncode == 2


def test_create_device_and_rotate_key_answers_carry_a_certificate(brokers, tmp_path):
    from test_control import Control, Local
    local = Local(brokers, tmp_path / "local")
    c = Control(local.port)
    data = c.ok("createDevice", id="cert-dev", password="pw", key={"type": "ec"})
    check_certificate(data["certificate"], "cert-dev", data["public_key"], 3650, tmp_path)
    data = c.ok("rotateKey", id="cert-dev", type="rsa")
    check_certificate(data["certificate"], "cert-dev", data["public_key"], 3650, tmp_path)
    assert "BEGIN CERTIFICATE" in ctl("device", "rotate-key", "seed", "-p", local.port, "-u", "admin", "-P", "adminpw").stdout
    # an id longer than a common name: the device is made, the answer says why there is no certificate
    data = c.ok("createDevice", id="y" * 70, password="pw", key={"type": "ec"})
    assert "certificate" not in data and "common name" in data["certificate_error"]
    c.close()


# ---- akenzactl akenza: against the REST stand-in, whose credentials the MQTT stand-in trusts --------

WORKSPACE, DATA_FLOW = "2900000000000000", "0800000000000005"


class Onboarding:
    """An edge (not started) with a registry and key store, the MQTT stand-in, and the REST stand-in
    writing its credentials where the MQTT stand-in reads them."""

    def __init__(self, brokers, tmp_path, pki, standin, rest_opts=None, known=()):
        from akenza_rest_standin import RestStandin
        self.tmp, self.pki, self.standin = tmp_path, pki, standin
        self.edge = Edge(brokers, tmp_path / "edge", standin.port, pki.ca_cert)
        self.edge.acl.write_text(self.edge.acl.read_text() + "topic readwrite $CONTROL/akenza/#\n")
        self.rest = RestStandin(tmp_path / "rest", pki, standin.keys, devices=known, **(rest_opts or {}))

    def env(self, key=None):
        import os
        e = dict(os.environ)
        e["AKENZA_API_KEY"] = key or self.rest.api_key
        return e

    def api(self, *args, key=None, registry=True, timeout=300):
        """akenzactl akenza ... against the REST stand-in (with --registry unless told not to)."""
        extra = ["--registry", self.edge.registry] if registry else []
        r = ctl("akenza", *args, *extra, "--api-url", self.rest.url, "--api-cafile", self.pki.ca_cert,
                env=self.env(key), timeout=timeout)
        assert self.rest.api_key not in r.stdout + r.stderr and self.rest.ro_key not in r.stdout + r.stderr
        return r

    def register_json(self, *args, **kw):
        r = self.api("register", *args, "--json", **kw)
        return r, json.loads(r.stdout)


@pytest.fixture
def onb(brokers, tmp_path, pki, standin):
    made = []

    def make(**kw):
        o = Onboarding(brokers, tmp_path / f"o{len(made)}", pki, standin, **kw)
        made.append(o)
        return o
    yield make
    for o in made:
        o.rest.stop()


def pem_body(text):
    return "".join(l for l in text.strip().splitlines() if not l.startswith("-----"))


@pytest.mark.parametrize("cert", [False, True], ids=["public-key", "certificate"])
def test_keygen_register_and_the_edge_is_accepted_upstream(onb, cert):
    o = onb(known=["dev-1"])
    ids = ["dev-1", "dev-2", "dev-3"]
    for i in ids:
        o.edge.add_device(i, password="pw-x", kind="rsa" if i == "dev-3" else "ec", write=False)
    o.edge.write_registry()
    flags = ["--cert"] if cert else []
    # without --create, the devices akenza lacks fail and the others go on
    r = o.api("register", "--all", *flags)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "dev-2: FAILED: akenza has no device" in r.stdout and "dev-3: FAILED" in r.stdout
    assert "dev-1: uploaded current key as " + ("EC256_X509_PEM" if cert else "EC256_PEM") in r.stdout
    assert "3 devices: 1 registered, 0 unchanged, 2 failed" in r.stdout
    r, doc = o.register_json("--all", "--create", "--workspace", WORKSPACE, "--data-flow", DATA_FLOW, *flags)
    assert r.returncode == 0, r.stdout + r.stderr
    res = {d["id"]: d for d in doc["devices"]}
    assert res["dev-1"]["already_registered"] == 1 and res["dev-1"]["uploaded"] == 0 and not res["dev-1"]["created"]
    assert res["dev-2"]["created"] and res["dev-2"]["uploaded"] == 1
    assert doc["summary"] | {"seconds": 0, "waited_s": 0} == {
        "devices": 3, "failed": 0, "changed": 2, "uploaded": 2, "created": 2, "requests": 8, "retries": 0,
        "throttled": 0, "server_errors": 0, "waited_s": 0, "seconds": 0, "dry_run": False}
    for i in ids:
        dev = o.rest.device(i)
        assert dev and dev["connectivity"] == "MQTT" and dev["dataFlowId"] == DATA_FLOW
        creds = o.rest.credentials(i)
        assert len(creds) == 1
        kind = "RSA256" if i == "dev-3" else "EC256"
        assert creds[0]["algorithm"] == kind + ("_X509_PEM" if cert else "_PEM")
        if cert:
            pub = openssl("x509", "-noout", "-pubkey", input=creds[0]["publicKey"])
            assert pem_body(pub) == pem_body((o.edge.keys / f"{i}.pub.pem").read_text())
        else:
            assert pem_body(creds[0]["publicKey"]) == pem_body((o.edge.keys / f"{i}.pub.pem").read_text())
    # the edge's devices are accepted upstream with the keys registered through the API
    o.edge.start()
    admin = o.edge.admin()
    for i in ids:
        o.edge.wait_state(admin, i, "connected")
        o.edge.sensor(i).publish(up(i), f'{{"from":"{i}"}}'.encode())
    wait_for(lambda: all(o.standin.uplinks(up(i)) for i in ids), 10, what="every device's uplink")
    # again: nothing to do, two reads per device
    before = len(o.rest.requests())
    r = o.api("register", "--all", *flags)
    assert r.returncode == 0 and "3 devices: 0 registered, 3 unchanged, 0 failed" in r.stdout
    assert [m for m, p, s in o.rest.requests()[before:]] == ["GET"] * 6


def test_rotation_register_commit_prune(onb, tmp_path):
    o = onb(rest_opts={"max_page_size": 1})   # every list comes a credential a page
    o.edge.add_device("rot-1")
    r = o.api("register", "rot-1", "--create", "--workspace", WORKSPACE, "--data-flow", DATA_FLOW)
    assert r.returncode == 0, r.stdout + r.stderr
    o.edge.start()
    admin = o.edge.admin()
    old_kid = o.edge.wait_state(admin, "rot-1", "connected")["kid"]
    conn = ["-p", o.edge.port, "-u", "admin", "-P", "adminpw"]
    api = ["--api-url", o.rest.url, "--api-cafile", o.pki.ca_cert]
    r = ctl("device", "rotate-key", "rot-1", "--register", *api, *conn, env=o.env())
    assert r.returncode == 0, r.stdout + r.stderr
    next_kid = json.loads(r.stdout[:r.stdout.rindex("}") + 1].split("\nrot-1:")[0])["next_kid"]
    assert "rot-1: uploaded pending key as EC256_PEM" in r.stdout
    assert len(o.rest.credentials("rot-1")) == 2
    # prune before commit deletes nothing: both keys are the device's
    r = o.api("prune", "rot-1")
    assert r.returncode == 0 and "deleted 0 old credentials, kept 2 (current and pending)" in r.stdout
    assert ctl("device", "commit-key", "rot-1", *conn).returncode == 0
    wait_for(lambda: o.edge.status(admin, "rot-1")["kid"] == next_kid and
             o.edge.status(admin, "rot-1")["state"] == "connected", 20, what="the new key in use")
    o.standin.wait_log(f"accepted client 'rot-1' kid {next_kid}")
    r = o.api("prune", "--all", "--dry-run")
    assert r.returncode == 0 and "would delete 1 old credential, kept 1" in r.stdout
    assert len(o.rest.credentials("rot-1")) == 2
    r = o.api("register", "--all")   # both keys are there, the second on the second page
    assert r.returncode == 0 and "current key already registered" in r.stdout \
        and "1 devices: 0 registered, 1 unchanged, 0 failed" in r.stdout
    assert any("page=1&size=100" in p for m, p, st in o.rest.requests())
    r = o.api("prune", "--all")
    assert r.returncode == 0 and "rot-1: deleted 1 old credential, kept 1 (current)" in r.stdout
    creds = o.rest.credentials("rot-1")
    assert len(creds) == 1
    # still accepted after a fresh login; the retired key is refused
    assert ctl("device", "reconnect", "rot-1", *conn).returncode == 0
    o.standin.broker.wait_log(f"accepted client 'rot-1' kid {next_kid}")
    wait_for(lambda: o.standin.log().count(f"accepted client 'rot-1' kid {next_kid}") >= 2, 20, what="a new login")
    o.edge.sensor("rot-1").publish(up("rot-1"), b'{"after":"prune"}')
    wait_for(lambda: b'{"after":"prune"}' in o.standin.uplinks(up("rot-1")), 10, what="the uplink after prune")
    retired = next(o.edge.keys.glob("rot-1.retired-*.pem"))
    from test_standin import connect_rc
    for key, want in ((retired, 5), (o.edge.keys / "rot-1.pem", 0)):
        tok = ctl("token", "--device", "rot-1", "--key", key).stdout.strip()
        assert connect_rc(o.standin.port, o.pki.ca_cert, "rot-1", tok) == want, key
    assert f"kid {old_kid[:16]}" not in json.dumps(creds)
    # a pending key made without --register: register finds it in the registry's next_key
    assert ctl("device", "rotate-key", "rot-1", *conn).returncode == 0
    r = o.api("register", "rot-1", "--cert")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "current key already registered" in r.stdout and "uploaded pending key as EC256_X509_PEM" in r.stdout
    assert sorted(c["algorithm"] for c in o.rest.credentials("rot-1")) == ["EC256_PEM", "EC256_X509_PEM"]


@pytest.mark.parametrize("reset", ["seconds", "epoch"])
def test_rate_limits_are_respected_and_storms_retried(onb, reset):
    opts = {"rate_limit": 6, "rate_window": 1, "faults": "429,okx2,503,okx2,429,okx2,503,okx2,429"}
    if reset == "epoch":
        opts["epoch_reset"] = True
    o = onb(rest_opts=opts)
    ids = [f"st-{i}" for i in range(8)]
    for i in ids:
        o.edge.add_device(i, write=False)
    o.edge.write_registry()
    r, doc = o.register_json("--all", "--create", "--workspace", WORKSPACE, "--data-flow", DATA_FLOW)
    assert r.returncode == 0, r.stdout + r.stderr
    s = doc["summary"]
    assert s["failed"] == 0 and s["uploaded"] == 8
    assert s["throttled"] == 3 and s["server_errors"] == 2 and s["retries"] == 5
    statuses = [st for m, p, st in o.rest.requests()]
    # the scripted storm, and not one 429 more: the client waits for the window the headers announce
    assert statuses.count(429) == 3 and statuses.count(503) == 2
    assert s["requests"] == len(statuses) == 8 * 3 + 5
    assert s["waited_s"] >= 3   # 24 real requests, 6 a second
    assert all(len(o.rest.credentials(i)) == 1 for i in ids)


def test_a_terminal_gets_a_progress_bar(onb):
    import os
    import pty
    o = onb(known=["t-1", "t-2"])
    for i in ("t-1", "t-2", "t-3"):
        o.edge.add_device(i, write=False)
    o.edge.write_registry()
    master, slave = pty.openpty()
    p = subprocess.Popen([str(AKENZACTL), "akenza", "register", "--all", "--registry", o.edge.registry, "--api-url",
                          o.rest.url, "--api-cafile", o.pki.ca_cert], stdout=slave, stderr=slave, env=o.env())
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:   # EIO: the other side is closed
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert p.wait(30) == 1
    text = out.decode()
    assert "\r[##########                    ] 1/3 devices, 0 failed" in text
    assert "\r\x1b[Kt-3: FAILED: akenza has no device" in text
    assert "t-1: uploaded" not in text   # successes only move the bar
    assert "\r\x1b[K3 devices: 2 registered, 0 unchanged, 1 failed" in text


def test_retries_are_bounded_and_a_failed_device_does_not_stop_the_others(onb):
    o = onb(known=["b-0", "b-1", "b-2"], rest_opts={"faults": "429x4"})
    for i in ("b-0", "b-1", "b-2"):
        o.edge.add_device(i, write=False)
    o.edge.write_registry()
    r = o.api("register", "--all", "--max-retries", "1")
    assert r.returncode == 1
    assert "b-0: FAILED: GET /v3/devices/by-device-id?deviceId=b-0: HTTP 429, 1 retries spent" in r.stdout
    assert "b-1: FAILED" in r.stdout and "b-2: uploaded current key" in r.stdout
    assert "3 devices: 1 registered, 0 unchanged, 2 failed" in r.stdout


def test_wrong_or_missing_api_key_and_key_files(onb, tmp_path):
    o = onb(known=["k-1"])
    o.edge.add_device("k-1")
    o.edge.add_device("k-2")
    r = o.api("register", "--all", key="akz-wrong-key-123")
    assert r.returncode == 1 and "HTTP 401" in r.stdout and "check the API key" in r.stdout
    assert "k-2: FAILED: not tried: akenza refused the API key (HTTP 401)" in r.stdout
    assert len(o.rest.requests()) == 1
    assert "akz-wrong-key-123" not in r.stdout + r.stderr
    # a read-only key looks up but may not upload
    r = o.api("register", "--all", key=o.rest.ro_key)
    assert r.returncode == 1 and "HTTP 403" in r.stdout and "lacks a permission" in r.stdout
    assert "k-2: FAILED: akenza has no device" in r.stdout   # a 403 is about one request, not the key
    assert o.rest.credentials("k-1") == []
    # the key from a file only its owner can read; never as an argument
    f = tmp_path / "api.key"
    f.write_text(o.rest.api_key + "\n")
    f.chmod(0o644)
    env = o.env()
    del env["AKENZA_API_KEY"]
    args = ["akenza", "register", "--all", "--registry", o.edge.registry, "--api-url", o.rest.url,
            "--api-cafile", o.pki.ca_cert, "--api-key-file", f]
    r = ctl(*args, env=env)
    assert r.returncode == 1 and "group or others can read it: chmod 600" in r.stderr
    f.chmod(0o600)
    r = ctl(*args, env=env)
    assert r.returncode == 1 and "k-1: uploaded current key" in r.stdout, r.stdout + r.stderr
    r = ctl(*args[:-2], env=env)
    assert r.returncode == 1 and "no API key" in r.stderr
    for given in (["--api-key", o.rest.api_key], ["--api-key=" + o.rest.api_key], ["--api-k", o.rest.api_key]):
        r = ctl(*args[:-2], *given, env=env)
        assert r.returncode == 2 and o.rest.api_key not in r.stdout + r.stderr, given
        assert "never an argument" in r.stderr or "ambiguous" in r.stderr
    # TLS is verified: another CA's certificate is refused, and http is not spoken
    r = ctl(*args[:-4], "--api-cafile", o.pki.other_ca("rest-rogue")[1], "--api-key-file", f, env=env)
    assert r.returncode == 1 and "certificate" in r.stdout.lower() and "k-2: FAILED: not tried" in r.stdout
    # an API that cannot be reached: bounded retries, then the rest are not tried
    r = ctl(*args[:-6], "--api-url", "https://localhost:1", "--max-retries", "2", "--api-key-file", f, env=env)
    assert r.returncode == 1 and "k-1: FAILED" in r.stdout and "2 retries spent" in r.stdout
    assert "k-2: FAILED: not tried: " in r.stdout
    r = ctl(*args[:-6], "--api-url", o.rest.url.replace("https", "http"), "--api-key-file", f, env=env)
    assert r.returncode == 1 and "only https://" in r.stderr


def test_unknown_device_with_and_without_create(onb):
    o = onb()
    o.edge.add_device("u-1")
    r = o.api("register", "u-1")
    assert r.returncode == 1 and "akenza has no device with this deviceId" in r.stdout
    assert o.rest.device("u-1") is None
    r = o.api("register", "u-1", "--create", "--workspace", WORKSPACE, "--data-flow", DATA_FLOW, "--dry-run")
    assert r.returncode == 0 and "u-1: would be created in akenza; would upload current key" in r.stdout
    assert o.rest.device("u-1") is None and all(m == "GET" for m, p, s in o.rest.requests())
    r = o.api("register", "u-1", "--create", "--workspace", "2999999999999999", "--data-flow", DATA_FLOW)
    assert r.returncode == 1 and "HTTP 404: Workspace with id 2999999999999999 not found" in r.stdout
    r = o.api("register", "u-1", "--create", "--workspace", WORKSPACE)
    assert r.returncode == 2 and "--create goes with --workspace and --data-flow" in r.stderr
    r = o.api("register", "u-1", "--create", "--workspace", WORKSPACE, "--data-flow", DATA_FLOW)
    assert r.returncode == 0 and "u-1: created in akenza; uploaded current key" in r.stdout
    posts = [(m, p, s) for m, p, s in o.rest.requests() if m == "POST"]
    assert posts[-2:] == [("POST", "/v3/devices", 201), ("POST", f"/v3/device-authorization/devices/{o.rest.device('u-1')['id']}/credentials", 201)]
    r = o.api("register", "not-in-registry")
    assert r.returncode == 1 and "not-in-registry: FAILED: not in the registry" in r.stdout


# ---- akenzactl akenza import ---------------------------------------------------------------------

CSV = '''deviceId,username,password,key type
# a comment, and a blank line

imp-1,,pw-one,ec
imp-2,room-2,"pw, with a comma and ""quotes""",rsa
 imp-3 , , pw-three , ec
'''


def test_import_csv_into_the_registry_then_register_and_connect(onb, tmp_path):
    o = onb()
    o.edge.add_device("existing")
    csv = tmp_path / "fleet.csv"
    csv.write_text(CSV)
    r = o.api("import", csv, "--iterations", "1000", "--register", "--create", "--workspace", WORKSPACE,
              "--data-flow", DATA_FLOW, "--cert")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "imported 3 devices into" in r.stdout and "3 devices: 3 registered" in r.stdout
    reg = json.loads(o.edge.registry.read_text())
    assert [d["id"] for d in reg["devices"]] == ["existing", "imp-1", "imp-2", "imp-3"]
    assert reg["devices"][2]["username"] == "room-2" and "username" not in reg["devices"][1]
    assert all(d["password"].startswith("$7$1000$") for d in reg["devices"][1:])
    for i in ("imp-1", "imp-2", "imp-3"):
        assert oct((o.edge.keys / f"{i}.pem").stat().st_mode & 0o777) == "0o600"
        assert o.rest.credentials(i)[0]["algorithm"] == ("RSA256_X509_PEM" if i == "imp-2" else "EC256_X509_PEM")
    assert ctl("check-registry", o.edge.registry).returncode == 0
    o.edge.start()
    admin = o.edge.admin()
    for i, user, pw in (("imp-1", "imp-1", "pw-one"), ("imp-2", "room-2", 'pw, with a comma and "quotes"'),
                        ("imp-3", "imp-3", "pw-three")):
        o.edge.wait_state(admin, i, "connected")
        o.edge.sensor(user, password=pw).publish(up(i), b"{}")
    wait_for(lambda: all(o.standin.uplinks(up(i)) for i in ("imp-1", "imp-2", "imp-3")), 10, what="the uplinks")


def test_import_bad_rows_are_named_and_nothing_is_applied(onb, tmp_path):
    o = onb()
    o.edge.add_device("taken")
    before = o.edge.registry.read_text()
    keys_before = sorted(p.name for p in o.edge.keys.iterdir())
    csv = tmp_path / "bad.csv"
    csv.write_text("good-1,,pw,ec\n"
                   "bad/id,,pw,ec\n"
                   "good-2,,,ec\n"
                   "good-3,,pw,dsa\n"
                   "good-4,,pw\n"
                   "taken,,pw,ec\n"
                   "good-1,,pw,ec\n"
                   'good-5,,"open,ec\n'
                   "good-6,good-1,pw,ec\n")
    r = o.api("import", csv, "--iterations", "1000", registry=True)
    assert r.returncode == 1
    for want in (f"{csv}:2: deviceId 'bad/id' contains '/'", f"{csv}:3: password: empty",
                 f"{csv}:4: key type 'dsa' is not ec, rsa", f"{csv}:5: 3 fields",
                 f"{csv}:8: a quoted field is not closed", "problems: nothing imported"):
        assert want in r.stderr, want
    # once the rows are well formed, names are checked against each other and the registry
    csv.write_text("good-1,,pw,ec\ntaken,,pw,ec\ngood-1,,pw,ec\ngood-6,good-1,pw,ec\n")
    r = o.api("import", csv, "--iterations", "1000")
    assert r.returncode == 1
    for want in (f"{csv}:2: deviceId 'taken' exists already", f"{csv}:3: deviceId 'good-1' again (line 1)",
                 f"{csv}:4: username or deviceId 'good-1' clashes with line 1"):
        assert want in r.stderr, want
    assert o.edge.registry.read_text() == before
    assert sorted(p.name for p in o.edge.keys.iterdir()) == keys_before
    # a key file in the way is found while applying: what was made is taken back
    csv.write_text("new-1,,pw,ec\nnew-2,,pw,ec\n")
    (o.edge.keys / "new-2.pub.pem").write_text("in the way")
    r = o.api("import", csv, "--iterations", "1000")
    assert r.returncode == 1 and "new-2.pub.pem" in r.stderr
    assert o.edge.registry.read_text() == before
    assert sorted(p.name for p in o.edge.keys.iterdir()) == sorted(keys_before + ["new-2.pub.pem"])
    # --dry-run checks and writes nothing
    (o.edge.keys / "new-2.pub.pem").unlink()
    r = o.api("import", csv, "--dry-run")
    assert r.returncode == 0 and "2 devices can be imported" in r.stdout
    assert o.edge.registry.read_text() == before


def test_import_through_the_broker_every_row_or_none(brokers, tmp_path, onb):
    from test_control import Control, Local
    o = onb()
    local = Local(brokers, tmp_path / "local")
    conn = ["--broker", "-p", local.port, "-u", "admin", "-P", "adminpw"]
    csv = tmp_path / "fleet.csv"
    csv.write_text("b-1,,pw-1,ec\nb-2,,pw-2,ec\nb-3,,pw-3,ec\n")
    (local.keys / "b-3.pem").write_text("left over from a deleted device")
    r = o.api("import", csv, *conn, registry=False)
    assert r.returncode == 1 and "nothing imported: the 2 devices created before line 3 were deleted again" in r.stderr
    c = Control(local.port)
    assert [d["id"] for d in c.ok("listDevices")["devices"]] == ["seed"]
    # the control API keeps a deleted device's key files, and the import says so, file by file
    for i in ("b-1", "b-2"):
        assert f"device '{i}' deleted again; the broker kept its key file {local.keys / i}.pem" in r.stderr
        (local.keys / f"{i}.pem").unlink()
        (local.keys / f"{i}.pub.pem").unlink()
    (local.keys / "b-3.pem").unlink()
    r = o.api("import", csv, *conn, "--register", "--create", "--workspace", WORKSPACE, "--data-flow", DATA_FLOW,
              registry=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "imported 3 devices into the broker" in r.stdout and "3 devices: 3 registered" in r.stdout
    assert sorted(d["id"] for d in c.ok("listDevices")["devices"]) == ["b-1", "b-2", "b-3", "seed"]
    for i in ("b-1", "b-2", "b-3"):
        pub = c.ok("getDevice", id=i)["device"]["key"]["public_key"]
        assert pem_body(o.rest.credentials(i)[0]["publicKey"]) == pem_body(pub)
    assert local.login("b-2", "pw-2") == 0
    r = o.api("import", csv, *conn, registry=False)
    assert r.returncode == 1 and "deviceId 'b-1' exists already" in r.stderr
    c.close()
