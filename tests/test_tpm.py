# SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause
"""Device keys held in a TPM 2.0 (swtpm started by the tests, OpenSSL's tpm2 provider): kids and
tokens that PyJWT and the akenza stand-in accept, generation inside the TPM (akenzactl and the
control API), and the faults: TPM absent at start, gone, hanging, a key it no longer has."""
import base64
import hashlib
import os
import stat
import time

import jwt
import pytest

from conftest import AKENZACTL, run, wait_for
from edge import Edge, password_hash
from swtpm import Swtpm
from test_control import Control

AUD = "https://akenza.io/devices/"


def kid_of_pem(path):
    """akenza's kid of a public key PEM file: SHA-256 of its DER."""
    body = "".join(l for l in open(path).read().strip().splitlines() if not l.startswith("-----"))
    return hashlib.sha256(base64.b64decode(body)).hexdigest()


def ctl(tpm, *args, check=True):
    return run([AKENZACTL, *args], check=check, env=dict(os.environ, **tpm.env()))


def check_token(token, device_id, pub_pem_path, alg):
    """PyJWT verifies the token as akenza does: signature with the uploaded public key, audience,
    expiry; the header names the algorithm and the kid."""
    pub = open(pub_pem_path).read()
    header = jwt.get_unverified_header(token)
    assert header == {"alg": alg, "kid": kid_of_pem(pub_pem_path), "typ": "JWT"}
    claims = jwt.decode(token, pub, algorithms=[alg], audience=AUD + device_id)
    assert claims["exp"] - claims["iat"] == 1200 and abs(claims["iat"] - time.time()) < 60


def check_certificate(path, cn, kid):
    """The self-signed certificate (akenza's X.509 credential) is signed by the key it holds
    (OpenSSL verifies it against itself), names cn, and holds the key with this kid."""
    r = run(["openssl", "verify", "-CAfile", str(path), "-check_ss_sig", str(path)], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"CN = {cn}" in run(["openssl", "x509", "-in", str(path), "-noout", "-subject"]).stdout
    pub = path.with_suffix(".check.pub")
    run(["openssl", "x509", "-in", str(path), "-noout", "-pubkey", "-out", str(pub)])
    assert kid_of_pem(pub) == kid


@pytest.fixture
def tpm(tmp_path):
    t = Swtpm(tmp_path / "swtpm")
    yield t
    t.stop()


def transient_handles(tpm):
    return tpm.tool("tpm2_getcap", "handles-transient").stdout.strip()


def test_tpm_keys_make_kids_and_tokens_pyjwt_accepts(tpm, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    for dev, kind, alg in (("tpm-ec", "ec", "ES256"), ("tpm-rsa", "rsa", "RS256")):
        kid = tpm.keygen(keys, dev, kind, extra=["--cert"])
        priv, pub = keys / f"{dev}.pem", keys / f"{dev}.pub.pem"
        check_certificate(keys / f"{dev}.cert.pem", dev, kid)
        # The key never existed outside the TPM: the file is the TPM's blob.
        assert priv.read_text().startswith("-----BEGIN TSS2 PRIVATE KEY-----")
        assert stat.S_IMODE(priv.stat().st_mode) == 0o600
        assert kid == kid_of_pem(pub)
        # The kid from the blob (read without the TPM) and from the public key agree.
        assert ctl(tpm, "fingerprint", str(priv)).stdout.strip() == kid
        token = ctl(tpm, "token", "--device", dev, "--key", str(priv), "--providers", "default,tpm2").stdout.strip()
        check_token(token, dev, pub, alg)

    # A key made by the tpm2 provider itself (openssl genpkey), named in an OpenSSL config file.
    env = dict(os.environ, **tpm.env())
    blob, pub = tmp_path / "ossl.pem", tmp_path / "ossl.pub.pem"
    run(["openssl", "genpkey", "-provider", "tpm2", "-provider", "default", "-algorithm", "EC",
         "-pkeyopt", "group:P-256", "-out", str(blob)], env=env)
    os.chmod(blob, 0o600)
    run(["openssl", "pkey", "-provider", "tpm2", "-provider", "default", "-in", str(blob), "-pubout",
         "-out", str(pub)], env=env)
    conf = tmp_path / "openssl.cnf"
    conf.write_text("openssl_conf = init\n[init]\nproviders = provs\n[provs]\ndefault = on\ntpm2 = on\n"
                    "[on]\nactivate = 1\n")
    token = ctl(tpm, "token", "--device", "d1", "--key", str(blob), "--openssl-conf", str(conf)).stdout.strip()
    check_token(token, "d1", pub, "ES256")

    # A persistent key, named by its handle.
    uri = tpm.persistent_key("0x81000001")
    hpub = tpm.public_pem("0x81000001", tmp_path / "handle.pub.pem")
    assert ctl(tpm, "fingerprint", "--providers", "default,tpm2", uri).stdout.strip() == kid_of_pem(hpub)
    token = ctl(tpm, "token", "--device", "d2", "--key", uri, "--providers", "default,tpm2").stdout.strip()
    check_token(token, "d2", hpub, "ES256")

    # Every key was unloaded from the TPM after use (it holds three at most).
    assert transient_handles(tpm) == ""

    # The blob copied to another box is useless: another TPM cannot load it.
    other = Swtpm(tmp_path / "other")
    try:
        r = ctl(other, "token", "--device", "tpm-ec", "--key", str(keys / "tpm-ec.pem"),
                "--providers", "default,tpm2", check=False)
        assert r.returncode == 1 and not r.stdout
        assert f"signing failed: {keys / 'tpm-ec.pem'}: the TPM cannot load the key" in r.stderr
    finally:
        other.stop()


def tpm_edge(brokers, tmp_path, standin, pki, tpm, extra_options=None):
    """An edge broker with the tpm2 provider configured, reaching tpm; not started."""
    e = Edge(brokers, tmp_path / "edge", standin.port, pki.ca_cert)
    e.options.update({"providers": "default,tpm2", **(extra_options or {})})
    e.acl.write_text(e.acl.read_text() + "topic readwrite $CONTROL/akenza/#\n")
    return e


def add_tpm_device(edge, standin, tpm, dev, kind="ec"):
    tpm.keygen(edge.keys, dev, kind)
    edge.devices.append({"id": dev, "password": password_hash("pw-x"), "enabled": True})
    standin.register(dev, edge.keys / f"{dev}.pub.pem")


def test_tpm_devices_through_the_bridge(brokers, tmp_path, standin, pki, tpm):
    edge = tpm_edge(brokers, tmp_path, standin, pki, tpm)
    add_tpm_device(edge, standin, tpm, "tpm-ec", "ec")
    add_tpm_device(edge, standin, tpm, "tpm-rsa", "rsa")
    standin.register("file-ec", edge.add_device("file-ec", write=False))
    edge.write_registry()
    edge.start(env=tpm.env())
    admin = edge.admin()
    obs = standin.observer()
    for dev in ("tpm-ec", "tpm-rsa", "file-ec"):
        edge.wait_state(admin, dev, "connected")
        s = edge.sensor(dev)
        s.publish(f"/up/device/id/{dev}", b'{"t":1}', qos=1)
        wait_for(lambda: (f"/up/device/id/{dev}", b'{"t":1}') in obs.received(), 10, what=f"{dev}'s uplink upstream")
        s.close()
    log = standin.log()
    assert "standin: accepted client 'tpm-ec'" in log and "alg ES256" in log
    assert "standin: accepted client 'tpm-rsa'" in log and "alg RS256" in log

    # The control API makes a device whose key is generated inside the TPM.
    c = Control(edge.port)
    try:
        d = c.ok("createDevice", id="tpm-new", password="pw-x", key={"type": "ec", "store": "tpm2"})
        key_file = edge.keys / "tpm-new.pem"
        assert key_file.read_text().startswith("-----BEGIN TSS2 PRIVATE KEY-----")
        pub = tmp_path / "tpm-new.pub.pem"
        pub.write_text(d["public_key"])
        assert d["kid"] == kid_of_pem(pub)
        cert = tmp_path / "tpm-new.cert.pem"
        cert.write_text(d["certificate"])
        check_certificate(cert, "tpm-new", d["kid"])
        assert c.ok("getDevice", id="tpm-new")["device"]["key"]["store"] == "tpm2"
        standin.register("tpm-new", pub)
        c.ok("reconnectDevice", id="tpm-new")
        edge.wait_state(admin, "tpm-new", "connected")
        # rotateKey makes the next key in the same store; a bad store is refused.
        r = c.ok("rotateKey", id="tpm-new")
        assert (edge.keys / "tpm-new.next.pem").read_text().startswith("-----BEGIN TSS2 PRIVATE KEY-----")
        assert r["next_kid"] == ctl(tpm, "fingerprint", str(edge.keys / "tpm-new.next.pem")).stdout.strip()
        assert "key store must be" in c.err("createDevice", id="x", password="p", key={"type": "ec", "store": "hsm"})
        assert c.ok("getDevice", id="file-ec")["device"]["key"]["store"] == "file"
    finally:
        c.close()
    assert transient_handles(tpm) == ""


def device_error(edge, admin, dev, needle, timeout=20):
    """Waits until the device's status shows a last_error containing needle; returns the status."""
    def seen():
        st = edge.status(admin, dev)
        return st if needle in st.get("last_error", "") and st["state"] != "connected" else None
    return wait_for(seen, timeout, interval=0.2, what=f"{dev}'s error '{needle}'")


def uplink_flows(edge, obs, dev, payload):
    s = edge.sensor(dev)
    try:
        s.publish(f"/up/device/id/{dev}", payload, qos=1)
        wait_for(lambda: (f"/up/device/id/{dev}", payload) in obs.received(), 10, what=f"{dev}'s uplink")
    finally:
        s.close()


def test_tpm_faults(brokers, tmp_path, standin, pki, tpm):
    """Absent at start, killed and restarted, hanging, a key it no longer has: each fault names the
    device and the key, leaves the other devices alone, and the device is retried and recovers."""
    edge = tpm_edge(brokers, tmp_path, standin, pki, tpm, {"key_timeout": "4"})
    add_tpm_device(edge, standin, tpm, "tpm-a")
    uri = tpm.persistent_key("0x81000002")
    edge.devices.append({"id": "tpm-h", "password": password_hash("pw-x"), "enabled": True, "key": uri})
    standin.register("tpm-h", tpm.public_pem("0x81000002", tmp_path / "h.pub.pem"))
    standin.register("file-a", edge.add_device("file-a", write=False))
    edge.write_registry()
    key_a = str(edge.keys / "tpm-a.pem")

    # Absent at start: a persistent handle's public key comes from the TPM, so that device is
    # refused with the registry; a TSS2 blob is read without it, so that device waits for the TPM.
    tpm.stop()
    edge.start(env=tpm.env(), expect_start=False)
    assert "0x81000002" in edge.broker.log()
    edge.devices = [d for d in edge.devices if d["id"] != "tpm-h"]
    edge.write_registry()
    edge.start(env=tpm.env())
    admin = edge.admin()
    edge.wait_state(admin, "file-a", "connected")
    st = device_error(edge, admin, "tpm-a", "cannot load OpenSSL provider tpm2")
    assert key_a in st["last_error"]
    assert "device 'tpm-a'" in edge.broker.log()
    tpm.start()
    c = Control(edge.port)
    try:
        c.ok("reconnectDevice", id="tpm-a")   # or wait for the backoff
        edge.wait_state(admin, "tpm-a", "connected")
        obs = standin.observer()

        # Killed while devices are connected: the next token fails and names the key; the TPM
        # restarted (it forgot every loaded key), the device connects again.
        tpm.stop()
        c.ok("reconnectDevice", id="tpm-a")
        device_error(edge, admin, "tpm-a", key_a)
        uplink_flows(edge, obs, "file-a", b"while the TPM is gone")
        tpm.start()
        c.ok("reconnectDevice", id="tpm-a")
        edge.wait_state(admin, "tpm-a", "connected")

        # Hanging: the key thread waits on it, nobody else does; after key_timeout the device
        # backs off, and the broker answers and relays meanwhile.
        tpm.pause()
        try:
            c.ok("reconnectDevice", id="tpm-a")
            time.sleep(0.5)   # the key thread is stuck in the TPM by now
            t0 = time.monotonic()
            assert c.ok("getStatus") is not None
            assert time.monotonic() - t0 < 1.5, "the broker thread waited on the TPM"
            # The bridge thread, which sends every uplink, relays for the other devices while the
            # key thread waits (up to key_timeout, 4 s): the uplink is through before the TPM
            # device gives up.
            uplink_flows(edge, obs, "file-a", b"while the TPM hangs")
            assert edge.status(admin, "tpm-a")["state"] == "connecting"
            device_error(edge, admin, "tpm-a", "no answer from the key's device")
        finally:
            tpm.resume()
        c.ok("reconnectDevice", id="tpm-a")
        edge.wait_state(admin, "tpm-a", "connected")

        # A key the TPM no longer has: the persistent key, evicted while its device is connected.
        edge.devices.append({"id": "tpm-h", "password": password_hash("pw-x"), "enabled": True, "key": uri})
        edge.write_registry()
        edge.broker.sighup()
        edge.wait_state(admin, "tpm-h", "connected")
        tpm.evict("0x81000002")
        c.ok("reconnectDevice", id="tpm-h")
        st = device_error(edge, admin, "tpm-h", "handle:0x81000002")
        assert "signing failed" in st["last_error"]
        # Another key made persistent under the same handle is never signed with.
        tpm.persistent_key("0x81000002")
        c.ok("reconnectDevice", id="tpm-h")
        device_error(edge, admin, "tpm-h", "the device now holds another key under this name")
        uplink_flows(edge, obs, "tpm-a", b"the other TPM device")
        assert edge.status(admin, "file-a")["state"] == "connected"
    finally:
        c.close()
    assert edge.broker.proc.poll() is None


def test_tpm_token_refresh_without_loss(brokers, tmp_path, standin, pki, tpm):
    """A 60 s token from a TPM key is refreshed (signed while the connection's uplinks drain)
    while a sensor keeps publishing QoS 1: nothing lost, nothing out of order, no expired token."""
    edge = tpm_edge(brokers, tmp_path, standin, pki, tpm, {"token_lifetime": "60"})
    add_tpm_device(edge, standin, tpm, "tpm-r")
    edge.write_registry()
    edge.start(env=tpm.env())
    admin = edge.admin()
    edge.wait_state(admin, "tpm-r", "connected")
    obs = standin.observer()
    s = edge.sensor("tpm-r")
    topic = "/up/device/id/tpm-r"
    sent, deadline = 0, time.monotonic() + 90

    def accepted():
        return standin.log().count("standin: accepted client 'tpm-r'")
    while accepted() < 2 and time.monotonic() < deadline:
        s.publish(topic, f"{sent}".encode(), qos=1)
        sent += 1
        time.sleep(0.05)
    assert accepted() >= 2, "no token refresh in 90 s"
    wait_for(lambda: len([p for t, p in obs.received() if t == topic]) >= sent, 30, what="every uplink")
    firsts = list(dict.fromkeys(p for t, p in obs.received() if t == topic))
    assert firsts == [f"{i}".encode() for i in range(sent)]
    assert "expired: disconnecting" not in standin.log()
    edge.wait_state(admin, "tpm-r", "connected")
    s.close()
