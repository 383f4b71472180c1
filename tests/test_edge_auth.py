# SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause
"""The edge side against a real broker: registry, local passwords, per-device ACLs, reload, refusals."""
import json
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from conftest import AKENZACTL, PLUGIN, free_port, run, wait_for
from edge import Sensor, make_key, password_hash


def mosquitto_passwd_hash(password, sha512=False):
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "pw"
        run(["mosquitto_passwd", *(["-H", "sha512"] if sha512 else []), "-b", "-c", str(f), "u", password])
        return f.read_text().strip().split(":", 1)[1]


class Local:
    """An edge broker with the plugin and no bridge, plus a password_file user for local apps."""

    def __init__(self, brokers, d, devices, gateways=(), extra=""):
        self.brokers, self.dir = brokers, Path(d)
        self.keys = self.dir / "keys"
        self.keys.mkdir(parents=True, exist_ok=True)
        self.registry = self.dir / "devices.json"
        for dev in devices:
            if not (self.keys / f"{dev['id']}.pem").exists():
                make_key(self.keys, dev["id"])
        self.write(devices, gateways)
        self.port = free_port()
        pw = self.dir / "local.pw"
        run(["mosquitto_passwd", "-b", "-c", str(pw), "app", "apppw"])
        acl = self.dir / "acl"
        acl.write_text("user app\ntopic readwrite app/#\n")
        self.conf = "\n".join([f"listener {self.port} 127.0.0.1", "allow_anonymous false",
                               f"password_file {pw}", f"acl_file {acl}", f"plugin {PLUGIN}",
                               f"plugin_opt_devices {self.registry}", "plugin_opt_bridge false", extra])
        self.broker = None

    def write(self, devices, gateways=()):
        tmp = self.registry.with_suffix(".tmp")
        tmp.write_text(json.dumps({"devices": list(devices), "gateways": list(gateways)}))
        tmp.replace(self.registry)

    def start(self, **kw):
        self.broker = self.brokers(self.conf, self.port, name="local", **kw)
        return self.broker

    def client(self, user, password, protocol=mqtt.MQTTv311):
        s = Sensor(self.port, user, password, protocol=protocol)
        return s, s.connect()


def dev(i, pw="pw", **kw):
    return {"id": i, "password": password_hash(pw), **kw}


@pytest.fixture
def local(brokers, tmp_path):
    def make(devices, gateways=(), extra="", start=True):
        l = Local(brokers, tmp_path / "local", devices, gateways, extra)
        if start:
            l.start()
        return l
    return make


def test_passwords(local):
    devices = [
        {"id": "d7", "password": mosquitto_passwd_hash("seven")},
        {"id": "d6", "password": mosquitto_passwd_hash("six", sha512=True)},
        # akenzactl's own format (its default cost is checked below; a cheaper hash keeps the
        # equalizing check of unknown usernames, sized to the costliest hash, within the budget
        # of failed checks that every client of this test shares on 127.0.0.1)
        {"id": "dk", "password": subprocess.run([str(AKENZACTL), "passwd", "--iterations", "1000"], input="kpw\n",
                                                capture_output=True, text=True, check=True).stdout.strip()},
        {"id": "dev-x", "username": "sensor-x", "password": password_hash("xpw")},
        {"id": "off", "password": password_hash("pw"), "enabled": False},
    ]
    assert devices[2]["password"].startswith("$7$1000$")
    assert subprocess.run([str(AKENZACTL), "passwd"], input="kpw\n", capture_output=True, text=True,
                          check=True).stdout.startswith("$7$210000$")
    l = local(devices)
    for user, pw in (("d7", "seven"), ("d6", "six"), ("dk", "kpw"), ("sensor-x", "xpw"), ("app", "apppw")):
        s, rc = l.client(user, pw)
        assert rc == 0, f"{user}: {rc}"
        s.close()
    for user, pw in (("d7", "six"), ("d6", ""), ("sensor-x", "wrong"), ("dev-x", "xpw"), ("off", "pw"),
                     ("app", "nope"), ("nobody", "x")):
        s, rc = l.client(user, pw)
        assert rc == 5, f"{user} should be refused, got {rc}"
    log = l.broker.log()
    assert "refused user 'off'" in log and "device is disabled" in log
    assert "refused user 'd7'" in log and "wrong password" in log
    assert "six" not in log.replace("d6", "").replace("sixty", "")  # no password in the log


def test_acl_v311_and_v5(local):
    l = local([dev("a"), dev("b")])
    spy, rc = l.client("b", "pw")
    spy.subscribe("/down/device/id/b/#")
    a, rc = l.client("a", "pw")
    a5, rc5 = l.client("a", "pw", protocol=mqtt.MQTTv5)
    assert rc == 0 and rc5 == 0
    # publishing: own up topic and below only
    a.publish("/up/device/id/a", b"ok")
    a.publish("/up/device/id/a/alerts", b"ok")
    # v5: the denied QoS 1 publish gets reason code 0x87 in its PUBACK
    acks = {}
    a5.c.on_publish = lambda c, u, mid, *rest: acks.setdefault(mid, rest)
    info = a5.c.publish("/up/device/id/b", b"spoof", 1)
    info.wait_for_publish(5)
    # subscriptions: own down tree only; v5 gets 0x87 in the SUBACK
    granted = {}

    def on_sub(c, u, mid, codes, props=None):
        granted[mid] = [getattr(x, "value", x) for x in codes]
    a5.c.on_subscribe = on_sub
    for topic in ("/down/device/id/a/#", "/down/device/id/b/#", "/down/device/id/+/#", "#", "$SYS/#"):
        r, mid = a5.c.subscribe(topic, 1)
        wait_for(lambda: mid in granted, 5, what=f"SUBACK for {topic}")
        assert granted[mid] == ([1] if topic == "/down/device/id/a/#" else [0x87]), topic
    a3_granted = {}
    a.c.on_subscribe = lambda c, u, mid, codes: a3_granted.setdefault(mid, codes)
    r, mid = a.c.subscribe("/down/device/id/b/#", 1)
    wait_for(lambda: mid in a3_granted, 5, what="v3 SUBACK")
    assert a3_granted[mid] == (128,)
    # a 3.1.1 denied publish is acknowledged but goes nowhere
    a.publish("/down/device/id/b/cmd", b"spoof")
    a.publish("/up/device/id/b", b"spoof")
    time.sleep(0.5)
    assert spy.received() == []
    log = l.broker.log()
    assert "denied publish on '/up/device/id/b' to user 'a'" in log
    assert "Denied PUBLISH" in log or "denied publish" in log


def test_v5_denied_publish_reason_code(local):
    """paho 1.6 does not surface PUBACK reason codes; read the raw PUBACK off the wire."""
    import socket
    import struct
    l = local([dev("a"), dev("b")])

    def utf8(s):
        b = s.encode()
        return struct.pack("!H", len(b)) + b
    with socket.create_connection(("127.0.0.1", l.port), timeout=5) as s:
        var = utf8("MQTT") + bytes([5, 0xC2]) + struct.pack("!H", 30) + b"\x00"
        payload = utf8("raw-v5") + utf8("a") + utf8("pw")
        body = var + payload
        s.sendall(bytes([0x10, len(body)]) + body)
        connack = s.recv(64)
        assert connack[0] == 0x20 and connack[3] == 0
        body = utf8("/up/device/id/b") + struct.pack("!H", 7) + b"\x00" + b"spoof"
        s.sendall(bytes([0x32, len(body)]) + body)
        puback = s.recv(64)
        assert puback[0] == 0x40
        assert struct.unpack("!H", puback[2:4])[0] == 7 and puback[4] == 0x87


def test_gateways(local):
    l = local([dev("g1"), dev("g2"), dev("g3")],
              [{"username": "lora", "password": password_hash("gw"), "devices": ["g1", "g2"]},
               {"username": "red", "password": password_hash("all"), "devices": ["*"]}])
    spy, _ = l.client("app", "apppw")
    watcher, _ = l.client("g3", "pw")
    watcher.subscribe("/down/device/id/g3/#")
    gw, rc = l.client("lora", "gw")
    assert rc == 0
    gw.subscribe("/down/device/id/g1/#")
    gw.subscribe("/down/device/id/g2/#")
    gw.publish("/up/device/id/g1", b"1")
    gw.publish("/up/device/id/g2/x", b"2")
    granted = {}
    gw.c.on_subscribe = lambda c, u, mid, codes: granted.setdefault(mid, codes)
    r, mid = gw.c.subscribe("/down/device/id/g3/#", 1)
    wait_for(lambda: mid in granted, 5, what="SUBACK")
    assert granted[mid] == (128,)
    gw.publish("/up/device/id/g3", b"not for you")
    assert "denied publish on '/up/device/id/g3' to user 'lora'" in l.broker.log()
    star, rc = l.client("red", "all")
    assert rc == 0
    star.subscribe("/down/device/id/g3/#")


def test_unknown_user_falls_through_to_password_file(local):
    l = local([dev("a")])
    app, rc = l.client("app", "apppw")
    assert rc == 0
    app.subscribe("app/#")
    app.publish("app/x", b"hello")
    wait_for(lambda: ("app/x", b"hello") in app.received(), 5, what="local app's own message")


def test_failures_slow_down(local):
    """Five different wrong passwords within a minute lock the username; a password tried again is
    answered from memory and counts once (a sensor retrying an old password does not lock itself)."""
    l = local([dev("a", "right")])
    for _ in range(6):
        s, rc = l.client("a", "wrong")
        assert rc == 5
    s, rc = l.client("a", "right")
    assert rc == 0, "a repeated wrong password counted as more than one failure"
    s.close()
    for i in range(5):
        s, rc = l.client("a", f"wrong-{i}")
        assert rc == 5
    s, rc = l.client("a", "right")
    assert rc == 5, "the right password must be refused while locked"
    log = l.broker.log()
    assert "5 failed logins for user 'a'" in log and "locked for" in log
    other, rc = l.client("app", "apppw")
    assert rc == 0, "a lockout of one user does not affect others"


def test_cached_login_resets_the_failure_count(local):
    """Four failures, a good login answered from the cache, one more failure: no lockout."""
    l = local([dev("a", "right")])
    s, rc = l.client("a", "right")   # checked, then cached
    assert rc == 0
    s.close()
    for i in range(4):
        assert l.client("a", f"bad-{i}")[1] == 5
    s, rc = l.client("a", "right")   # from the cache
    assert rc == 0
    s.close()
    assert l.client("a", "bad-4")[1] == 5
    s, rc = l.client("a", "right")
    assert rc == 0, "the cached login did not reset the failure count"
    s.close()
    assert "failed logins for user 'a'" not in l.broker.log()


def test_reload(local):
    l = local([dev("keep"), dev("gone"), dev("later-off")])
    keep, _ = l.client("keep", "pw")
    gone, _ = l.client("gone", "pw")
    off, _ = l.client("later-off", "pw")
    disconnected = {}
    gone.c.on_disconnect = lambda *a: disconnected.setdefault("gone", True)
    off.c.on_disconnect = lambda *a: disconnected.setdefault("off", True)
    keep.c.on_disconnect = lambda *a: disconnected.setdefault("keep", True)
    make_key(l.keys, "new")
    l.write([dev("keep"), dev("later-off", enabled=False), dev("new")])
    l.broker.sighup()
    l.broker.wait_log("reloaded")
    wait_for(lambda: "gone" in disconnected and "off" in disconnected, 10, what="removed/disabled kicked")
    assert "keep" not in disconnected
    n, rc = l.client("new", "pw")
    assert rc == 0
    s, rc = l.client("gone", "pw")
    assert rc == 5

    # a broken registry leaves the one in force
    l.registry.write_text('{"devices": [ {"id": "keep", "password": "plain"} ]}')
    l.broker.sighup()
    l.broker.wait_log("keeping the previous registry")
    log = l.broker.log()
    assert "devices[0].password: not a password hash" in log
    s, rc = l.client("new", "pw")
    assert rc == 0
    l.registry.write_text('{"devices": [ {"id": "keep", ')
    l.broker.sighup()
    wait_for(lambda: "line 1, column" in l.broker.log(), 10, what="syntax error with position")
    assert "keep" not in disconnected


@pytest.mark.parametrize("case,expect", [
    ("missing", "cannot open: No such file or directory"),
    ("malformed", "line 3, column"),
    ("duplicate-id", "duplicate id 'a' (first at devices[0])"),
    ("duplicate-username", "duplicate username 'u' (first at devices[0])"),
    ("bad-key", "key:"),
    ("plain-password", "plain-text passwords are refused"),
    ("unknown-option", "plugin_opt_devcies: unknown option"),
    ("bad-id", "contains '/', '+' or '#'"),
    ("unknown-gateway-device", "unknown device 'zz'"),
])
def test_startup_refusals(local, case, expect):
    l = local([dev("a")], start=False)
    reg = l.registry
    if case == "missing":
        reg.unlink()
    elif case == "malformed":
        reg.write_text('{\n "devices": [\n  {"id": "a" "password": "x"}\n ]\n}\n')
    elif case == "duplicate-id":
        l.write([dev("a"), dev("a")])
    elif case == "duplicate-username":
        make_key(l.keys, "b")
        l.write([dev("a", username="u"), dev("b", username="u")])
    elif case == "bad-key":
        (l.keys / "a.pem").write_text("garbage")
    elif case == "plain-password":
        l.write([{"id": "a", "password": "secret"}])
    elif case == "unknown-option":
        l.conf += "\nplugin_opt_devcies x\n"
    elif case == "bad-id":
        l.write([dev("a/b")])
    elif case == "unknown-gateway-device":
        l.write([dev("a")], [{"username": "g", "password": password_hash("x"), "devices": ["zz"]}])
    b = l.start(expect_start=False)
    assert b.proc.returncode != 0
    log = b.log()
    assert expect in log, log[-2000:]
    assert "refusing to start" in log


def test_check_registry_cli(tmp_path):
    keys = tmp_path / "keys"
    make_key(keys, "a")
    reg = tmp_path / "devices.json"
    reg.write_text(json.dumps({"devices": [dev("a")]}))
    r = subprocess.run([str(AKENZACTL), "check-registry", str(reg)], capture_output=True, text=True)
    assert r.returncode == 0 and "OK: 1 devices (1 enabled), 0 gateways" in r.stdout
    reg.write_text(json.dumps({"devices": [dev("a"), {"id": "a", "password": "p"}, {"id": "c/d"}],
                               "extra": 1}))
    r = subprocess.run([str(AKENZACTL), "check-registry", str(reg)], capture_output=True, text=True)
    assert r.returncode == 1
    for want in ("unknown field 'extra'", "devices[1].password: not a password hash",
                 "devices[2].password: missing", "devices[2].id: 'c/d'", "duplicate id 'a'"):
        assert want in r.stderr, r.stderr
