# SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause
"""Test harness for the edge side: devices with real keys, a registry, an edge broker with the plugin,
and paho clients for sensors. Used by the bridge tests, the demo and the benchmarks."""
import json
import os
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from conftest import PLUGIN, free_port, run, wait_for

_hash_cache = {}


def password_hash(password):
    """A $7$ hash made by the real mosquitto_passwd (cached: each costs ~100 ms)."""
    if password not in _hash_cache:
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            f = Path(d) / "pw"
            run(["mosquitto_passwd", "-b", "-c", str(f), "u", password])
            _hash_cache[password] = f.read_text().strip().split(":", 1)[1]
    return _hash_cache[password]


def make_key(keydir, device_id, kind="ec"):
    """Writes keydir/<id>.pem (0600) and keydir/<id>.pub.pem with the openssl CLI; returns their paths."""
    keydir = Path(keydir)
    keydir.mkdir(parents=True, exist_ok=True)
    priv, pub = keydir / f"{device_id}.pem", keydir / f"{device_id}.pub.pem"
    if kind == "ec":
        run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", priv])
    else:
        run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", priv])
    os.chmod(priv, 0o600)
    run(["openssl", "pkey", "-in", priv, "-pubout", "-out", pub])
    return priv, pub


class Sensor:
    """A plain local MQTT client (no crypto), as a sensor would be. Collects what it receives."""

    def __init__(self, port, username, password, client_id=None, protocol=mqtt.MQTTv311, clean=True):
        self.messages = []
        self.lock = threading.Lock()
        self.connect_rc = None
        kw = {"client_id": client_id or f"sensor-{username}-{os.getpid()}-{time.monotonic_ns()}",
              "protocol": protocol}
        if protocol != mqtt.MQTTv5:
            kw["clean_session"] = clean
        self.c = mqtt.Client(**kw)
        self.c.username_pw_set(username, password)
        self.c.on_message = self._on_message
        self.c.on_connect = self._on_connect
        self.port = port

    def _on_connect(self, c, u, flags, rc, props=None):
        self.connect_rc = rc

    def _on_message(self, c, u, msg):
        with self.lock:
            self.messages.append((msg.topic, msg.payload))

    def connect(self, timeout=10):
        self.c.connect("127.0.0.1", self.port, keepalive=30)
        self.c.loop_start()
        wait_for(lambda: self.connect_rc is not None, timeout, what="CONNACK")
        if self.connect_rc != 0:
            # paho would try again every second or two, with the same password, for ever
            self.c.loop_stop()
            self.c.disconnect()
        return self.connect_rc

    def subscribe(self, topic, qos=1, timeout=10):
        done = threading.Event()
        self.c.on_subscribe = lambda *a: done.set()
        self.c.subscribe(topic, qos)
        assert done.wait(timeout), f"no SUBACK for {topic}"

    def publish(self, topic, payload, qos=1, timeout=10):
        info = self.c.publish(topic, payload, qos)
        if qos:
            info.wait_for_publish(timeout)
            assert info.is_published(), f"no PUBACK for {topic}"
        return info

    def received(self):
        with self.lock:
            return list(self.messages)

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


class Edge:
    """A registry, a key store and an edge broker loading the plugin, bridged to `upstream`."""

    def __init__(self, brokers, workdir, upstream_port, cafile, extra="", host="localhost"):
        self.brokers = brokers
        self.dir = Path(workdir)
        self.keys = self.dir / "keys"
        self.keys.mkdir(parents=True, exist_ok=True)
        os.chmod(self.keys, 0o700)
        self.registry = self.dir / "devices.json"
        self.devices = []
        self.gateways = []
        self.port = free_port()
        self.admin_pw = self.dir / "admin.pw"
        run(["mosquitto_passwd", "-b", "-c", str(self.admin_pw), "admin", "adminpw"])
        # Mosquitto 2.0 denies what every plugin defers: local users outside the registry need
        # an acl_file (or dynamic-security) of their own.
        self.acl = self.dir / "acl"
        self.acl.write_text("user admin\ntopic readwrite #\ntopic read $SYS/#\n")
        self.options = {
            "devices": str(self.registry),
            "keystore": str(self.keys),
            "upstream_host": host,
            "upstream_port": str(upstream_port),
            "upstream_cafile": str(cafile),
            "status_interval": "200",
        }
        self.extra = extra
        self.broker = None

    def add_device(self, device_id, password="pw-" + "x", enabled=True, kind="ec", write=True):
        priv, pub = make_key(self.keys, device_id, kind)
        self.devices.append({"id": device_id, "password": password_hash(password), "enabled": enabled})
        if write:
            self.write_registry()
        return pub

    def remove_device(self, device_id):
        self.devices = [d for d in self.devices if d["id"] != device_id]
        self.write_registry()

    def write_registry(self):
        tmp = self.registry.with_suffix(".tmp")
        tmp.write_text(json.dumps({"devices": self.devices, "gateways": self.gateways}, indent=1))
        os.chmod(tmp, 0o600)
        tmp.replace(self.registry)

    def conf(self):
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous false",
                 f"password_file {self.admin_pw}", f"acl_file {self.acl}", f"plugin {PLUGIN}"]
        lines += [f"plugin_opt_{k} {v}" for k, v in self.options.items()]
        return "\n".join(lines) + "\n" + self.extra

    def start(self, **kw):
        if not self.registry.exists():
            self.write_registry()
        self.broker = self.brokers(self.conf(), self.port, name="edge", **kw)
        return self.broker

    def sensor(self, device_id, password="pw-x", **kw):
        s = Sensor(self.port, device_id, password, **kw)
        rc = s.connect()
        assert rc == 0, f"sensor {device_id} refused: rc={rc}\n{self.broker.log()[-3000:]}"
        return s

    def admin(self):
        s = Sensor(self.port, "admin", "adminpw")
        assert s.connect() == 0
        return s

    def status(self, admin, device_id, timeout=10):
        """The retained $SYS status of a device, as a dict."""
        topic = f"$SYS/broker/akenza/devices/{device_id}"
        admin.subscribe(topic, 0)
        msgs = wait_for(lambda: [p for t, p in admin.received() if t == topic], timeout,
                        what=f"status of {device_id}")
        return json.loads(msgs[-1])

    def wait_state(self, admin, device_id, state, timeout=20):
        topic = f"$SYS/broker/akenza/devices/{device_id}"
        admin.subscribe(topic, 0)

        def seen():
            for t, p in reversed(admin.received()):
                if t == topic and p:
                    return json.loads(p) if json.loads(p)["state"] == state else None
            return None
        return wait_for(seen, timeout, what=f"{device_id} in state {state}")


def counting_sensors(port, ids, password="pw-x", inflight=100):
    """Connected sensors for ids that record what the edge acknowledges: (sensors, sent, acked)
    with sent[id] = {mid: seq} to be filled by the caller and acked[id] = [mid, ...]."""
    sensors, sent, acked = {}, {i: {} for i in ids}, {i: [] for i in ids}
    for i in ids:
        s = Sensor(port, i, password)
        s.c.max_inflight_messages_set(inflight)
        s.c.on_publish = (lambda dev: lambda c, u, mid: acked[dev].append(mid))(i)
        assert s.connect() == 0
        sensors[i] = s
    return sensors, sent, acked


def check_acknowledged_arrived(standin, sent, acked, topic, timeout=90):
    """Waits for every uplink the edge acknowledged (payload: its seq) to be upstream, then
    asserts the first deliveries are in order per device and none is missing. Returns the
    duplicates (QoS 1 allows them). topic(id) is the device's uplink topic."""
    wait_for(lambda: all(len(acked[i]) == len(sent[i]) for i in sent), 60, what="every PUBACK from the edge")

    def upstream():
        by_topic = {}
        for t, p in standin.uplinks():
            by_topic.setdefault(t, []).append(p)
        return by_topic
    want = {i: {f"{sent[i][m]}".encode() for m in acked[i]} for i in sent}
    wait_for(lambda: all(want[i] <= set(upstream().get(topic(i), ())) for i in sent), timeout,
             interval=0.5, what="every acknowledged uplink upstream")
    final, dups = upstream(), 0
    for i in sent:
        got = final.get(topic(i), [])
        nums = [int(p) for p in dict.fromkeys(got)]
        assert nums == sorted(nums), f"{i}: reordered"
        assert len(nums) == len(sent[i]), f"{i}: {len(sent[i]) - len(nums)} uplinks missing"
        dups += len(got) - len(nums)
    return dups
