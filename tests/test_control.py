# SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause
"""The $CONTROL/akenza/v1 API against real brokers: every command, bad requests, concurrency,
persistence, the broker's ACL as the gate, key rotation through the bridge, akenzactl, mosquitto_rr."""
import hashlib
import json
import os
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from conftest import AKENZACTL, PLUGIN, disconnects, free_port, mosquitto_plugin, run, wait_for
from edge import Edge, Sensor, make_key, password_hash

TOPIC = "$CONTROL/akenza/v1"
RESPONSE = "$CONTROL/akenza/v1/response"


def kid_of_pem(pem):
    """akenza's kid: SHA-256 of the public key's DER (PEM body), EC points uncompressed."""
    import base64
    body = "".join(l for l in pem.strip().splitlines() if not l.startswith("-----"))
    return hashlib.sha256(base64.b64decode(body)).hexdigest()


class Control:
    """An admin client of the control API: subscribes to the answers, matches them by correlationData."""

    def __init__(self, port, user="admin", password="adminpw", protocol=mqtt.MQTTv311):
        self.answers = {}
        self.raw = []
        self.cond = threading.Condition()
        kw = {"client_id": f"ctl-{uuid.uuid4().hex[:8]}", "protocol": protocol}
        self.c = mqtt.Client(**kw)
        self.c.username_pw_set(user, password)
        self.c.on_message = self._on_message
        self.subscribed = threading.Event()
        self.granted = None

        def on_sub(c, u, mid, codes, props=None):
            self.granted = [getattr(x, "value", x) for x in codes]
            self.subscribed.set()
        self.c.on_subscribe = on_sub
        connected = threading.Event()
        self.c.on_connect = lambda c, u, f, rc, props=None: connected.set()
        self.c.connect("127.0.0.1", port, 30)
        self.c.loop_start()
        assert connected.wait(10)
        self.c.subscribe(RESPONSE, 1)
        assert self.subscribed.wait(10)

    def _on_message(self, c, u, msg):
        with self.cond:
            self.raw.append(msg.payload)
            try:
                doc = json.loads(msg.payload)
            except ValueError:
                return
            for r in doc.get("responses", []):
                if "correlationData" in r:
                    self.answers[r["correlationData"]] = r
            self.cond.notify_all()

    def send_raw(self, payload, qos=1):
        info = self.c.publish(TOPIC, payload, qos)
        if qos:
            info.wait_for_publish(10)

    def request(self, command, timeout=15, **fields):
        """Sends one command and returns its answer (a dict with data or error)."""
        corr = uuid.uuid4().hex
        self.send_raw(json.dumps({"commands": [{"command": command, "correlationData": corr, **fields}]}))
        with self.cond:
            assert self.cond.wait_for(lambda: corr in self.answers, timeout), f"no answer to {command}"
            a = self.answers.pop(corr)
        assert a["command"] == command
        return a

    def ok(self, command, **fields):
        a = self.request(command, **fields)
        assert "error" not in a, f"{command}: {a}"
        return a.get("data")

    def err(self, command, **fields):
        a = self.request(command, **fields)
        assert "error" in a and "data" not in a, f"{command} should fail: {a}"
        return a["error"]

    def next_raw(self, count_before, timeout=10):
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.raw) > count_before, timeout), "no answer"
            return json.loads(self.raw[count_before])

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


ACL = ("user admin\ntopic readwrite $CONTROL/akenza/#\ntopic read $SYS/#\n"
       "user admin2\ntopic readwrite $CONTROL/akenza/#\n"
       "user viewer\ntopic read $CONTROL/akenza/v1/response\ntopic readwrite app/#\n")


class Local:
    """An edge broker with the plugin (no bridge), admin users in a password_file and an acl_file."""

    def __init__(self, brokers, d, extra=""):
        self.brokers, self.dir = brokers, Path(d)
        self.keys = self.dir / "keys"
        self.keys.mkdir(parents=True, exist_ok=True)
        os.chmod(self.keys, 0o700)
        self.registry = self.dir / "devices.json"
        make_key(self.keys, "seed")
        self.registry.write_text(json.dumps({"devices": [
            {"id": "seed", "password": password_hash("pw"), "name": "kept field", "enabled": True}]}, indent=1))
        os.chmod(self.registry, 0o600)
        self.port = free_port()
        pw = self.dir / "admins.pw"
        run(["mosquitto_passwd", "-b", "-c", str(pw), "admin", "adminpw"])
        run(["mosquitto_passwd", "-b", str(pw), "admin2", "adminpw"])
        run(["mosquitto_passwd", "-b", str(pw), "viewer", "viewerpw"])
        acl = self.dir / "acl"
        acl.write_text(ACL)
        self.conf = "\n".join([f"listener {self.port} 127.0.0.1", "allow_anonymous false",
                               f"password_file {pw}", f"acl_file {acl}", f"plugin {PLUGIN}",
                               f"plugin_opt_devices {self.registry}", f"plugin_opt_keystore {self.keys}",
                               "plugin_opt_bridge false", "plugin_opt_auth_cache_seconds 0", extra])
        self.broker = self.brokers(self.conf, self.port, name="local")

    def login(self, user, password):
        s = Sensor(self.port, user, password)
        rc = s.connect()
        if rc == 0:
            s.close()
        return rc

    def doc(self):
        return json.loads(self.registry.read_text())


@pytest.fixture
def local(brokers, tmp_path):
    return Local(brokers, tmp_path / "local")


@pytest.fixture
def ctl(local):
    c = Control(local.port)
    yield c
    c.close()


def test_device_commands(local, ctl):
    # createDevice with a generated EC key
    d = ctl.ok("createDevice", id="dev-1", password="s3cret", key={"type": "ec"})
    assert d["id"] == "dev-1" and d["username"] == "dev-1" and d["enabled"] is True
    assert d["kid"] == kid_of_pem(d["public_key"]) == d["key"]["kid"]
    assert d["key"]["algorithm"] == "ES256"
    priv = local.keys / "dev-1.pem"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert (local.keys / "dev-1.pub.pem").read_text() == d["public_key"]
    fp = run([str(AKENZACTL), "fingerprint", str(priv)]).stdout.strip()
    assert fp == d["kid"]
    entry = [x for x in local.doc()["devices"] if x["id"] == "dev-1"][0]
    assert entry["password"].startswith("$7$") and "s3cret" not in local.registry.read_text()
    assert stat.S_IMODE(local.registry.stat().st_mode) == 0o600
    assert local.login("dev-1", "s3cret") == 0
    assert "s3cret" not in local.broker.log()

    # createDevice with an RSA key, a username and disabled; then a device from a key URI
    r = ctl.ok("createDevice", id="dev-2", username="sensor-two", password="pw2",
               key={"type": "rsa", "bits": 2048}, enabled=False)
    assert r["key"]["algorithm"] == "RS256" and r["enabled"] is False and r["username"] == "sensor-two"
    assert local.login("sensor-two", "pw2") == 5
    make_key(local.keys, "ext", "ec")
    u = ctl.ok("createDevice", id="dev-3", password="pw3", key={"uri": str(local.keys / "ext.pem")})
    assert u["key"]["uri"] == str(local.keys / "ext.pem")
    assert u["kid"] == kid_of_pem((local.keys / "ext.pub.pem").read_text())

    # listDevices / getDevice
    lst = ctl.ok("listDevices")
    assert [x["id"] for x in lst["devices"]] == ["seed", "dev-1", "dev-2", "dev-3"]
    assert lst["totalCount"] == 4
    assert {x["id"]: x["enabled"] for x in lst["devices"]}["dev-2"] is False
    g = ctl.ok("getDevice", id="dev-1")["device"]
    assert g["state"] == "bridge off" and g["kid"] == d["kid"] and "password" not in g

    # modifyDevice: password and username; enable/disable
    s = Sensor(local.port, "dev-1", "s3cret")
    assert s.connect() == 0
    kicked = threading.Event()
    s.c.on_disconnect = lambda *a: kicked.set()
    ctl.ok("modifyDevice", id="dev-1", password="new-pw", username="dev-one")
    assert kicked.wait(10), "a client whose password changed is disconnected"
    assert local.login("dev-1", "s3cret") == 5 and local.login("dev-one", "new-pw") == 0
    assert ctl.ok("enableDevice", id="dev-2")["enabled"] is True
    assert local.login("sensor-two", "pw2") == 0
    assert ctl.ok("disableDevice", id="dev-2")["enabled"] is False
    assert local.login("sensor-two", "pw2") == 5
    m = ctl.ok("modifyDevice", id="dev-2", enabled=True, key={"uri": str(local.keys / "ext.pem")})
    assert m["enabled"] is True and m["kid"] == u["kid"]

    # deleteDevice leaves the key files and says so
    dd = ctl.ok("deleteDevice", id="dev-1")
    assert str(priv) in dd["key_files_kept"] and "left in place" in dd["note"]
    assert priv.exists()
    assert "dev-1" not in [x["id"] for x in local.doc()["devices"]]
    assert local.login("dev-one", "new-pw") == 5

    # unknown fields of the file survive edits
    assert [x for x in local.doc()["devices"] if x["id"] == "seed"][0]["name"] == "kept field"

    # rotateKey / commitKey without a bridge: the registry and the key store
    old_kid = ctl.ok("getDevice", id="seed")["device"]["kid"]
    rk = ctl.ok("rotateKey", id="seed")
    assert rk["kid"] == old_kid and rk["next_kid"] == kid_of_pem(rk["public_key"]) != old_kid
    assert stat.S_IMODE((local.keys / "seed.next.pem").stat().st_mode) == 0o600
    nk = ctl.ok("getDevice", id="seed")["device"]["next_key"]
    assert nk["kid"] == rk["next_kid"] and nk["public_key"] == rk["public_key"]
    assert "pending key" in ctl.err("rotateKey", id="seed")
    ck = ctl.ok("commitKey", id="seed")
    assert ck["kid"] == rk["next_kid"] and ck["previous_kid"] == old_kid and "next_key" not in ck
    assert ck["key_file"] == str(local.keys / "seed.pem")
    assert run([str(AKENZACTL), "fingerprint", str(local.keys / "seed.pem")]).stdout.strip() == rk["next_kid"]
    assert not (local.keys / "seed.next.pem").exists()
    assert (local.keys / f"seed.retired-{old_kid[:16]}.pem").exists()
    assert "next_key" not in [x for x in local.doc()["devices"] if x["id"] == "seed"][0]
    assert "no pending key" in ctl.err("commitKey", id="seed")
    # a second rotation works the same way
    rk2 = ctl.ok("rotateKey", id="seed", type="rsa", bits=2048)
    assert rk2["algorithm"] == "RS256"
    assert ctl.ok("commitKey", id="seed")["kid"] == rk2["next_kid"]

    # reconnectDevice without a bridge, getStatus
    assert "bridge off" in ctl.err("reconnectDevice", id="seed")
    st = ctl.ok("getStatus")
    assert st["bridge"] == "off" and st["devices"] == 3 and st["version"]
    for k in ("connected", "uplinks", "downlinks", "queued", "refused", "errors", "gateways"):
        assert k in st
    # every answer echoed only our correlationData, and the broker is fine
    assert local.broker.proc.poll() is None


def test_gateway_commands(local, ctl):
    ctl.ok("createDevice", id="g1", password="pw", key={"type": "ec"})
    ctl.ok("createDevice", id="g2", password="pw", key={"type": "ec"})
    gw = ctl.ok("createGateway", username="lora", password="gwpw", devices=["g1"])["gateway"]
    assert gw == {"username": "lora", "devices": ["g1"]}
    assert ctl.ok("createGateway", username="red", password="all", devices=["*"])["gateway"]["devices"] == ["*"]
    assert [g["username"] for g in ctl.ok("listGateways")["gateways"]] == ["lora", "red"]
    assert ctl.ok("getGateway", username="lora")["gateway"]["devices"] == ["g1"]
    s = Sensor(local.port, "lora", "gwpw")
    assert s.connect() == 0
    s.publish("/up/device/id/g1", b"x")
    ctl.ok("modifyGateway", username="lora", devices=["g1", "g2"], password="gwpw2")
    assert local.login("lora", "gwpw") == 5 and local.login("lora", "gwpw2") == 0
    assert ctl.ok("getGateway", username="lora")["gateway"]["devices"] == ["g1", "g2"]
    # deleting a device takes it out of the gateways naming it
    dd = ctl.ok("deleteDevice", id="g2")
    assert dd["removed_from_gateways"] == ["lora"]
    assert ctl.ok("getGateway", username="lora")["gateway"]["devices"] == ["g1"]
    assert "already used" in ctl.err("createGateway", username="g1", password="x", devices=[])
    assert "unknown device 'nope'" in ctl.err("createGateway", username="x", password="x", devices=["nope"])
    assert "unknown gateway" in ctl.err("getGateway", username="nobody")
    assert "unknown gateway" in ctl.err("modifyGateway", username="nobody", password="x")
    ctl.ok("deleteGateway", username="lora")
    assert "unknown gateway" in ctl.err("deleteGateway", username="lora")
    assert local.login("lora", "gwpw2") == 5
    assert [g["username"] for g in ctl.ok("listGateways")["gateways"]] == ["red"]


def test_bad_requests_change_nothing(local, ctl):
    before = local.registry.read_bytes()
    n = len(ctl.raw)

    def raw_answer(payload):
        nonlocal n
        ctl.send_raw(payload)
        doc = ctl.next_raw(n)
        n += 1
        assert len(doc["responses"]) == 1 and "error" in doc["responses"][0], doc
        return doc["responses"][0]["error"]

    assert "not valid JSON" in raw_answer(b"{nope")
    assert "not valid JSON" in raw_answer(b"")
    assert "commands" in raw_answer(b'{"cmds": []}')
    assert "commands" in raw_answer(b'{"commands": {"command": "listDevices"}}')
    assert "empty" in raw_answer(b'{"commands": []}')
    assert "not an object" in raw_answer(b'{"commands": [42]}')
    assert "missing command" in raw_answer(b'{"commands": [{"id": "x"}]}')
    assert "correlationData" in raw_answer(b'{"commands": [{"command": "listDevices", "correlationData": 5}]}')
    big = json.dumps({"commands": [{"command": "listDevices", "pad": "x" * (70 * 1024)}]}).encode()
    assert "larger than 65536" in raw_answer(big)

    key = {"type": "ec"}
    assert ctl.err("frobnicate") == "unknown command"
    assert "missing field 'id'" in ctl.err("createDevice", password="x", key=key)
    assert "missing field 'password'" in ctl.err("createDevice", id="n1", key=key)
    assert "missing field 'key'" in ctl.err("createDevice", id="n1", password="x")
    assert "must be a string" in ctl.err("createDevice", id=5, password="x", key=key)
    assert "must be a string" in ctl.err("createDevice", id="n1", password=["x"], key=key)
    assert "true or false" in ctl.err("createDevice", id="n1", password="x", key=key, enabled="yes")
    assert "unknown field 'enable'" in ctl.err("createDevice", id="n1", password="x", key=key, enable=True)
    assert "invalid id" in ctl.err("createDevice", id="a/b", password="x", key=key)
    assert "invalid id" in ctl.err("createDevice", id="", password="x", key=key)
    assert "invalid id" in ctl.err("createDevice", id="x" * 200, password="x", key=key)
    assert "invalid id" in ctl.err("getDevice", id="+")
    assert "invalid username" in ctl.err("createDevice", id="n1", username="", password="x", key=key)
    assert "password must be" in ctl.err("createDevice", id="n1", password="", key=key)
    assert "already exists" in ctl.err("createDevice", id="seed", password="x", key=key)
    assert "already used" in ctl.err("createDevice", id="n1", username="seed", password="x", key=key)
    assert "not \"ec\" or \"rsa\"" in ctl.err("createDevice", id="n1", password="x", key={"type": "dsa"})
    assert "bits" in ctl.err("createDevice", id="n1", password="x", key={"type": "rsa", "bits": 1024})
    assert "bits" in ctl.err("createDevice", id="n1", password="x", key={"type": "ec", "bits": 2048})
    assert "not both" in ctl.err("createDevice", id="n1", password="x", key={"type": "ec", "uri": "/x"})
    assert "must be an object" in ctl.err("createDevice", id="n1", password="x", key="ec")
    # a key that does not load: the registry would be invalid, nothing is saved
    e = ctl.err("createDevice", id="n1", password="x", key={"uri": "/nonexistent/key.pem"})
    assert "would be invalid" in e and "devices.json.tmp" not in e
    assert "unknown device" in ctl.err("getDevice", id="ghost")
    assert "unknown device" in ctl.err("modifyDevice", id="ghost", password="x")
    assert "nothing to change" in ctl.err("modifyDevice", id="seed")
    assert "rotateKey" in ctl.err("modifyDevice", id="seed", key={"type": "ec"})
    assert "unknown device" in ctl.err("enableDevice", id="ghost")
    assert "unknown device" in ctl.err("deleteDevice", id="ghost")
    assert "unknown device" in ctl.err("rotateKey", id="ghost")
    assert "unknown device" in ctl.err("commitKey", id="ghost")
    assert "unknown device" in ctl.err("reconnectDevice", id="ghost")
    assert "missing field 'id'" in ctl.err("getDevice")
    assert "unknown field" in ctl.err("listDevices", id="x")
    assert "devices" in ctl.err("createGateway", username="g", password="x")
    assert "strings" in ctl.err("createGateway", username="g", password="x", devices=[1])

    # several commands in one request: one answer each, in order, a bad one does not stop the rest
    c = [{"command": "getDevice", "id": "seed", "correlationData": "a"}, {"command": "nope"},
         {"command": "getDevice", "id": "ghost", "correlationData": "c"}]
    n = len(ctl.raw)
    ctl.send_raw(json.dumps({"commands": c}))
    doc = ctl.next_raw(n)
    rs = doc["responses"]
    assert [r["command"] for r in rs] == ["getDevice", "nope", "getDevice"]
    assert "data" in rs[0] and rs[0]["correlationData"] == "a"
    assert "error" in rs[1] and "correlationData" not in rs[1]
    assert "error" in rs[2] and rs[2]["correlationData"] == "c"

    assert local.registry.read_bytes() == before
    assert not Path(str(local.registry) + ".tmp").exists()
    assert sorted(p.name for p in local.keys.iterdir()) == ["seed.pem", "seed.pub.pem"]
    assert local.broker.proc.poll() is None
    assert local.login("seed", "pw") == 0


def test_concurrent_admins(local):
    a, b = Control(local.port, "admin"), Control(local.port, "admin2")
    results = {}

    def creator(c, prefix):
        corrs = []
        for i in range(20):
            corr = f"{prefix}-{i}"
            corrs.append(corr)
            c.send_raw(json.dumps({"commands": [{"command": "createDevice", "id": f"{prefix}-{i}",
                                                 "password": "pw", "key": {"type": "ec"}, "correlationData": corr}]}))
        with c.cond:
            assert c.cond.wait_for(lambda: all(x in c.answers for x in corrs), 60)
            results[prefix] = [c.answers[x] for x in corrs]
    ts = [threading.Thread(target=creator, args=(a, "a")), threading.Thread(target=creator, args=(b, "b"))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(90)
    assert all("error" not in r for rs in results.values() for r in rs), results
    ids = {x["id"] for x in local.doc()["devices"]}
    assert {f"{p}-{i}" for p in "ab" for i in range(20)} <= ids
    listed = {x["id"] for x in a.ok("listDevices")["devices"]}
    assert listed == ids and len(ids) == 41
    a.close()
    b.close()


def test_change_survives_restart(local, ctl):
    ctl.ok("createDevice", id="persist", password="ppw", key={"type": "ec"})
    ctl.ok("createGateway", username="gw", password="gpw", devices=["persist"])
    ctl.close()
    local.broker.stop()
    local.broker.start()
    assert local.login("persist", "ppw") == 0 and local.login("gw", "gpw") == 0
    c = Control(local.port)
    assert "persist" in [x["id"] for x in c.ok("listDevices")["devices"]]
    c.close()


def test_acl_decides(local, ctl):
    before = local.registry.read_bytes()
    # a password_file user whom the acl_file does not allow to publish on $CONTROL/akenza/v1
    v = Control(local.port, "viewer", "viewerpw", protocol=mqtt.MQTTv5)
    n = len(ctl.raw)
    v.send_raw(json.dumps({"commands": [{"command": "createDevice", "id": "evil", "password": "x",
                                         "key": {"type": "ec"}, "correlationData": "evil"}]}))
    # a registry device: the plugin's ACL denies it everything outside its own topics
    dev = Sensor(local.port, "seed", "pw")
    assert dev.connect() == 0
    dev.c.publish(TOPIC, json.dumps({"commands": [{"command": "deleteDevice", "id": "seed"}]}), 1).wait_for_publish(5)
    granted = {}
    dev.c.on_subscribe = lambda c, u, mid, codes: granted.setdefault(mid, codes)
    r, mid = dev.c.subscribe(RESPONSE, 1)
    wait_for(lambda: mid in granted, 5, what="SUBACK")
    assert granted[mid] == (128,)
    time.sleep(1.0)
    assert len(ctl.raw) == n and v.raw == [], "a refused request must not be answered"
    assert local.registry.read_bytes() == before
    log = local.broker.log()
    assert "Denied PUBLISH" in log
    assert "denied publish on '$CONTROL/akenza/v1' to user 'seed'" in log
    assert "evil" not in [x["id"] for x in ctl.ok("listDevices")["devices"]]
    v.close()
    dev.close()


def test_mosquitto_rr(local):
    r = run(["mosquitto_rr", "-h", "127.0.0.1", "-p", str(local.port), "-u", "admin", "-P", "adminpw",
             "-t", TOPIC, "-e", RESPONSE, "-W", "10",
             "-m", '{"commands":[{"command":"getStatus"}]}'])
    doc = json.loads(r.stdout)
    assert doc["responses"][0]["command"] == "getStatus" and doc["responses"][0]["data"]["devices"] == 1


def ctl_cmd(local, *args, user="admin", password="adminpw", input=None, check=True):
    cmd = [str(AKENZACTL), *args, "-p", str(local.port), "-u", user, "-P", password]
    r = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=60)
    if check:
        assert r.returncode == 0, f"{args}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def test_akenzactl(local):
    for args in (["device", "--help"], ["gateway", "--help"], ["status", "--help"], ["device", "create", "--help"],
                 ["device", "list", "--help"], ["device", "rotate-key", "--help"], ["gateway", "create", "--help"]):
        r = subprocess.run([str(AKENZACTL), *args], capture_output=True, text=True)
        assert r.returncode == 0 and "usage:" in r.stdout, args
    r = ctl_cmd(local, "device", "create", "cli-1", "--type", "ec", input="clipw\n")
    d = json.loads(r.stdout)
    assert d["kid"] == kid_of_pem(d["public_key"])
    assert local.login("cli-1", "clipw") == 0
    ctl_cmd(local, "device", "create", "cli-2", "--password", "pw2", "--key-uri", str(local.keys / "seed.pem"),
            "--username", "c2", "--disabled")
    r = ctl_cmd(local, "device", "list")
    lines = r.stdout.strip().splitlines()
    assert any(l.split()[0] == "cli-1" for l in lines) and any(l.split()[0] == "cli-2" for l in lines)
    assert json.loads(ctl_cmd(local, "device", "get", "cli-2").stdout)["enabled"] is False
    ctl_cmd(local, "device", "enable", "cli-2")
    assert local.login("c2", "pw2") == 0
    ctl_cmd(local, "device", "disable", "cli-2")
    assert local.login("c2", "pw2") == 5
    ctl_cmd(local, "device", "modify", "cli-2", "--enable", "--password", "pw3")
    assert local.login("c2", "pw3") == 0
    rk = json.loads(ctl_cmd(local, "device", "rotate-key", "cli-1").stdout)
    ck = json.loads(ctl_cmd(local, "device", "commit-key", "cli-1").stdout)
    assert ck["kid"] == rk["next_kid"]
    r = ctl_cmd(local, "device", "reconnect", "cli-1", check=False)
    assert r.returncode == 1 and "bridge off" in r.stderr
    ctl_cmd(local, "gateway", "create", "gw1", "--password", "gpw", "--devices", "cli-1,cli-2")
    assert "gw1" in ctl_cmd(local, "gateway", "list").stdout
    assert json.loads(ctl_cmd(local, "gateway", "get", "gw1").stdout)["devices"] == ["cli-1", "cli-2"]
    ctl_cmd(local, "gateway", "modify", "gw1", "--devices", "*")
    assert json.loads(ctl_cmd(local, "gateway", "get", "gw1").stdout)["devices"] == ["*"]
    ctl_cmd(local, "gateway", "delete", "gw1")
    r = ctl_cmd(local, "device", "delete", "cli-2")
    assert "left in place" in r.stdout
    st = json.loads(ctl_cmd(local, "status").stdout)
    assert st["devices"] == 2
    # failures: an error answer, a usage error, no permission (bounded wait)
    r = ctl_cmd(local, "device", "get", "ghost", check=False)
    assert r.returncode == 1 and "unknown device 'ghost'" in r.stderr and r.stdout == ""
    r = ctl_cmd(local, "device", "frob", check=False)
    assert r.returncode == 2 and "unknown" in r.stderr
    r = ctl_cmd(local, "status", "-W", "2", user="viewer", password="viewerpw", check=False)
    assert r.returncode == 1 and ("not authorized" in r.stderr or "no answer" in r.stderr), r.stderr
    r = ctl_cmd(local, "status", user="admin", password="wrong", check=False)
    assert r.returncode == 1 and "connect" in r.stderr.lower()


# ---- with the bridge: rotation changes the key the upstream connection uses ----

@pytest.fixture
def edge(brokers, tmp_path, standin, pki):
    e = Edge(brokers, tmp_path / "edge", standin.port, pki.ca_cert)
    e.acl.write_text(e.acl.read_text() + "topic readwrite $CONTROL/akenza/#\n")
    yield e


def test_rotation_through_the_bridge(edge, standin):
    edge.write_registry()
    edge.start()
    admin = edge.admin()
    c = Control(edge.port)
    d = c.ok("createDevice", id="rot-1", password="pw", key={"type": "ec"})
    # created before akenza knew its key: refused, then a reconnect asks again at once
    # (instead of the minutes an unauthorized device waits)
    wait_for(lambda: c.ok("getDevice", id="rot-1")["device"]["state"] == "unauthorized", 15, what="refusal")
    standin.register("rot-1", edge.keys / "rot-1.pub.pem")
    c.ok("reconnectDevice", id="rot-1")
    st = edge.wait_state(admin, "rot-1", "connected")
    assert st["kid"] == d["kid"]
    g = c.ok("getDevice", id="rot-1")["device"]
    assert g["state"] == "connected" and g["upstream_kid"] == d["kid"] and g["token_expires"] > time.time()
    assert c.ok("getStatus")["connected"] == 1

    # reconnectDevice: a new connection (the stand-in sees a second login), and the old one ends
    # with a DISCONNECT, which the bridge's write buffer (plugin/tlsio.c) must send before closing
    accepted = standin.log().count("accepted client 'rot-1'")
    clean = disconnects(standin.log(), "rot-1")
    closed = disconnects(standin.log(), "rot-1", clean=False)
    c.ok("reconnectDevice", id="rot-1")
    wait_for(lambda: standin.log().count("accepted client 'rot-1'") > accepted, 15, what="a reconnect")
    wait_for(lambda: disconnects(standin.log(), "rot-1") > clean, 5, what="a clean DISCONNECT")
    assert disconnects(standin.log(), "rot-1", clean=False) == closed

    rk = c.ok("rotateKey", id="rot-1")
    assert c.ok("getDevice", id="rot-1")["device"]["upstream_kid"] == d["kid"], "the old key stays in use"
    # (the stand-in rescans its key directory when the directory changes: replace, not overwrite)
    (standin.keys / "rot-1.pub.pem").unlink()
    standin.register("rot-1", edge.keys / "rot-1.next.pub.pem")
    accepted = standin.log().count("accepted client 'rot-1'")
    c.ok("commitKey", id="rot-1")
    wait_for(lambda: standin.log().count("accepted client 'rot-1'") > accepted, 15, what="reconnect with the new key")

    def new_kid_connected():
        s = c.ok("getDevice", id="rot-1")["device"]
        return s["state"] == "connected" and s["upstream_kid"] == rk["next_kid"] and s["kid"] == rk["next_kid"]
    wait_for(new_kid_connected, 15, what="connected with the new kid")
    wait_for(lambda: edge.status(admin, "rot-1")["kid"] == rk["next_kid"], 10, what="status topic kid")
    # uplinks still flow
    obs = standin.observer()
    s = edge.sensor("rot-1", password="pw")
    s.publish("/up/device/id/rot-1", b"after-rotation")
    wait_for(lambda: ("/up/device/id/rot-1", b"after-rotation") in obs.received(), 10, what="uplink")
    # disable through the API: the upstream connection goes down
    c.ok("disableDevice", id="rot-1")
    wait_for(lambda: c.ok("getDevice", id="rot-1")["device"]["state"] == "disabled", 10, what="disabled")
    c.close()


def test_akenzactl_tls(brokers, tmp_path, pki):
    """TLS to the broker: the server's certificate is verified against --cafile, always."""
    tls_port = free_port()
    Local(brokers, tmp_path / "tls", extra="\n".join([
        f"listener {tls_port} 127.0.0.1", f"cafile {pki.ca_cert}", f"certfile {pki.server_cert}",
        f"keyfile {pki.server_key}"]))
    base = [str(AKENZACTL), "status", "-u", "admin", "-P", "adminpw", "-p", str(tls_port), "-W", "5"]
    r = subprocess.run(base + ["-h", "localhost", "--cafile", str(pki.ca_cert)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["devices"] == 1
    rogue_key, rogue_ca = pki.other_ca("rogue-ctl")
    r = subprocess.run(base + ["-h", "localhost", "--cafile", str(rogue_ca)], capture_output=True, text=True)
    assert r.returncode == 1 and "akenzactl:" in r.stderr and r.stdout == ""
    # a name the certificate does not carry
    r = subprocess.run(base + ["-h", "127.0.0.2", "--cafile", str(pki.ca_cert)], capture_output=True, text=True)
    assert r.returncode == 1
    r = subprocess.run(base + ["--insecure"], capture_output=True, text=True)
    assert r.returncode == 2, "there is no option to skip verification"


def test_garbage_never_hurts(local, ctl):
    """Random requests of every shape: each gets an answer, nothing changes, the broker lives on."""
    import random
    rnd = random.Random(1234)
    before = local.registry.read_bytes()
    names = ["listDevices", "getDevice", "createDevice", "modifyDevice", "enableDevice", "disableDevice",
             "deleteDevice", "rotateKey", "commitKey", "reconnectDevice", "getStatus", "listGateways",
             "getGateway", "createGateway", "modifyGateway", "deleteGateway", "", "x" * 300]
    fields = ["id", "username", "password", "key", "enabled", "devices", "type", "bits", "uri", "command"]

    def value(depth=0):
        k = rnd.randrange(9 if depth < 2 else 6)
        return [lambda: None, lambda: True, lambda: rnd.randint(-2**40, 2**40), lambda: rnd.random() * 1e300,
                lambda: "", lambda: "".join(chr(rnd.randrange(1, 0x2FF)) for _ in range(rnd.randrange(1, 20))),
                lambda: "/../" * 10,
                lambda: [value(depth + 1) for _ in range(rnd.randrange(4))],
                lambda: {rnd.choice(fields): value(depth + 1) for _ in range(rnd.randrange(4))}][k]()
    n = len(ctl.raw)
    sent = 0
    for _ in range(150):
        cmd = {f: value() for f in rnd.sample(fields, rnd.randrange(4))}
        cmd["command"] = rnd.choice(names) if rnd.random() < 0.9 else value()
        if cmd["command"] in ("modifyDevice", "deleteDevice", "disableDevice", "enableDevice",
                              "rotateKey", "commitKey", "deleteGateway", "modifyGateway"):
            cmd.pop("id", None)   # never touch the seed device by chance
            cmd.pop("username", None)
        ctl.send_raw(json.dumps({"commands": [cmd]}))
        sent += 1
    ctl.send_raw(bytes(rnd.randrange(256) for _ in range(500)))
    sent += 1
    with ctl.cond:
        assert ctl.cond.wait_for(lambda: len(ctl.raw) >= n + sent, 30), f"{len(ctl.raw) - n} of {sent} answered"
    for raw in ctl.raw[n:]:
        doc = json.loads(raw)
        assert len(doc["responses"]) == 1
    assert local.registry.read_bytes() == before
    assert local.broker.proc.poll() is None
    assert ctl.ok("getStatus")["devices"] == 1


def test_dynamic_security_role(brokers, tmp_path):
    """The README's dynamic-security role gives a user the control API; a user without it gets nothing."""
    d = tmp_path / "dynsec"
    d.mkdir()
    keys = d / "keys"
    make_key(keys, "seed")
    reg = d / "devices.json"
    reg.write_text(json.dumps({"devices": [{"id": "seed", "password": password_hash("pw")}]}))
    dyn = d / "dynsec.json"
    run(["mosquitto_ctrl", "dynsec", "init", str(dyn), "admin", "adminpw"])
    port = free_port()
    conf = "\n".join([f"listener {port} 127.0.0.1", "allow_anonymous false",
                      f"plugin {mosquitto_plugin('mosquitto_dynamic_security.so')}",
                      f"plugin_opt_config_file {dyn}",
                      f"plugin {PLUGIN}", f"plugin_opt_devices {reg}", f"plugin_opt_keystore {keys}",
                      "plugin_opt_bridge false"])
    brokers(conf, port, name="dynsec")

    def ctrl(*args):
        run(["mosquitto_ctrl", "-h", "127.0.0.1", "-p", str(port), "-u", "admin", "-P", "adminpw", "dynsec", *args])
    ctrl("createRole", "akenza-admin")
    ctrl("addRoleACL", "akenza-admin", "publishClientSend", "$CONTROL/akenza/v1", "allow")
    ctrl("addRoleACL", "akenza-admin", "subscribePattern", "$CONTROL/akenza/v1/response", "allow")
    ctrl("addRoleACL", "akenza-admin", "publishClientReceive", "$CONTROL/akenza/v1/response", "allow")
    ctrl("createClient", "ops", "-p", "opspw")
    ctrl("addClientRole", "ops", "akenza-admin")
    ctrl("createClient", "nobody", "-p", "nopw")
    ops = Control(port, "ops", "opspw")
    assert ops.ok("getStatus")["devices"] == 1
    ops.ok("createDevice", id="via-dynsec", password="pw", key={"type": "ec"})
    s = Sensor(port, "via-dynsec", "pw")
    assert s.connect() == 0    # the plugin still decides registry users
    s.close()
    n = len(ops.raw)
    nobody = Control(port, "nobody", "nopw", protocol=mqtt.MQTTv5)
    assert nobody.granted == [0x87]
    nobody.send_raw(json.dumps({"commands": [{"command": "deleteDevice", "id": "seed"}]}))
    time.sleep(1.0)
    assert len(ops.raw) == n, "a request without the role is not answered"
    assert "seed" in [x["id"] for x in ops.ok("listDevices")["devices"]]
    ops.close()
    nobody.close()
