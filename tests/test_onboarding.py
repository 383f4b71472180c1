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
