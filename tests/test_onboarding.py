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
