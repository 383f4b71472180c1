# SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause
"""The summary counters as Prometheus sees them through sapcc/mosquitto-exporter: each counter on a
$SYS topic of its own with a plain number, read with the exporter's own rule (main.go at
e097dec: subscribe to $SYS/# at QoS 0; metric name = parseTopic(topic), value = parseValue(payload))."""
import json
import re
import threading

import paho.mqtt.client as mqtt
import pytest

from conftest import wait_for
from edge import Edge

# The counter topics and the summary JSON field each one carries (README, docs/metrics.md).
COUNTERS = {
    "broker_akenza_upstream_devices": "devices",
    "broker_akenza_upstream_connected": "connected",
    "broker_akenza_upstream_connects": "connects",
    "broker_akenza_upstream_tls_resumed": "tls_resumed",
    "broker_akenza_uplinks_relayed": "uplinks",
    "broker_akenza_uplinks_queued": "queued",
    "broker_akenza_uplinks_refused": "refused",
    "broker_akenza_uplinks_expired": "expired",
    "broker_akenza_uplinks_orphaned": "orphaned",
    "broker_akenza_downlinks_relayed": "downlinks",
    "broker_akenza_errors": "errors",
    "broker_akenza_spool_bytes": "spool_bytes",
    "broker_akenza_spool_messages": "spool_msgs",
    "broker_akenza_spool_disk_bytes": "spool_disk_bytes",
    "broker_akenza_spool_segments": "spool_segments",
    "broker_akenza_spool_replayed": "spool_replayed",
    "broker_akenza_spool_io_errors": "spool_io_errors",
}
PROMETHEUS_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")   # what client_golang registers


def parse_topic(topic):
    """mosquitto-exporter's parseTopic."""
    name = topic.replace("$SYS/", "", 1)
    for c in "/ -.":
        name = name.replace(c, "_")
    return name


def parse_value(payload):
    """mosquitto-exporter's parseValue: the first number in the payload, else 0."""
    m = re.search(r"-?\d{1,}[.]\d{1,}|\d{1,}", payload)
    return float(m.group(0)) if m else 0.0


class Exporter:
    """What mosquitto-exporter keeps: one gauge per $SYS topic, plus every message in order."""

    def __init__(self, port):
        self.gauges, self.log = {}, []
        self.lock = threading.Lock()
        self.c = mqtt.Client(client_id="exporter-test")
        self.c.username_pw_set("admin", "adminpw")
        self.c.on_message = self._on_message
        subscribed = threading.Event()
        self.c.on_subscribe = lambda *a: subscribed.set()
        self.c.on_connect = lambda c, u, f, rc: c.subscribe("$SYS/#", 0)
        self.c.connect("127.0.0.1", port, 30)
        self.c.loop_start()
        assert subscribed.wait(10), "no SUBACK for $SYS/#"

    def _on_message(self, c, u, msg):
        payload = msg.payload.decode(errors="replace")
        with self.lock:
            self.gauges[msg.topic] = parse_value(payload)
            self.log.append((msg.topic, payload))

    def metrics(self):
        with self.lock:
            return {parse_topic(t): v for t, v in self.gauges.items()}

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def edge(brokers, tmp_path, standin, pki):
    return Edge(brokers, tmp_path / "edge", standin.port, pki.ca_cert)


def test_counters_are_one_gauge_each_for_mosquitto_exporter(edge, standin, tmp_path):
    edge.options["spool_dir"] = str(tmp_path / "spool")
    for i in ("m1", "m2"):
        standin.register(i, edge.add_device(i, write=False))
    edge.add_device("m3", write=False)            # its key is not in akenza: unauthorized
    edge.write_registry()
    edge.start()
    exp = Exporter(edge.port)
    admin = edge.admin()
    edge.wait_state(admin, "m3", "unauthorized")
    for i in ("m1", "m2"):
        edge.wait_state(admin, i, "connected")

    # real traffic: 7 + 5 QoS 1 uplinks, 3 downlinks
    s1, s2 = edge.sensor("m1"), edge.sensor("m2")
    s1.subscribe("/down/device/id/m1/#")
    for n, s, dev in ((7, s1, "m1"), (5, s2, "m2")):
        for k in range(n):
            s.publish(f"/up/device/id/{dev}", f"{k}".encode(), qos=1)
    for k in range(3):
        standin.publish_downlink("m1", f"d{k}".encode(), "/cmd")
    wait_for(lambda: len(standin.uplinks()) == 12, 10, what="12 uplinks at akenza")
    wait_for(lambda: len([t for t, _ in s1.received() if t == "/down/device/id/m1/cmd"]) == 3, 10,
             what="3 downlinks at the sensor")

    want = {"broker_akenza_uplinks_relayed": 12, "broker_akenza_downlinks_relayed": 3,
            "broker_akenza_upstream_devices": 3, "broker_akenza_upstream_connected": 2,
            "broker_akenza_uplinks_queued": 0, "broker_akenza_spool_messages": 0,
            "broker_akenza_uplinks_refused": 0}
    wait_for(lambda: all(exp.metrics().get(k) == v for k, v in want.items()), 10,
             what=f"the exporter's gauges at {want}")
    m = exp.metrics()
    assert m["broker_akenza_upstream_connects"] >= 2

    # every counter is a gauge of its own, equal to the summary's field
    def summary():
        for t, p in reversed(admin.received()):
            if t == "$SYS/broker/akenza/summary":
                return json.loads(p)
        return None
    admin.subscribe("$SYS/broker/akenza/summary", 0)
    wait_for(lambda: summary() and summary()["uplinks"] == 12 and summary()["downlinks"] == 3, 10,
             what="the JSON summary")
    doc = summary()
    assert set(COUNTERS.values()) == set(doc), "a summary field without a topic, or the reverse"
    wait_for(lambda: all(exp.metrics().get(k) == doc[f] for k, f in COUNTERS.items()), 10,
             what="every gauge equal to its summary field")

    # the exporter's view of the whole $SYS tree registers: valid, distinct metric names
    topics = set(exp.gauges)
    names = [parse_topic(t) for t in topics]
    assert all(PROMETHEUS_NAME.fullmatch(n) for n in names), [n for n in names if not PROMETHEUS_NAME.fullmatch(n)]
    assert len(set(names)) == len(names)
    # the counters' payloads are plain numbers, and a topic is published only when its value changes
    with exp.lock:
        log = [(t, p) for t, p in exp.log if parse_topic(t) in COUNTERS]
    assert all(re.fullmatch(r"\d+", p) for _, p in log)
    for name in COUNTERS:
        seq = [p for t, p in log if parse_topic(t) == name]
        assert seq and all(a != b for a, b in zip(seq, seq[1:])), f"{name}: {seq}"

    # retained, as Mosquitto's own $SYS topics: an exporter that connects later has every gauge at once
    exp.close()
    late = Exporter(edge.port)
    wait_for(lambda: all(late.metrics().get(k) == doc[f] for k, f in COUNTERS.items()), 5,
             what="the retained gauges")
    late.close()
    s1.close()
    s2.close()
    admin.close()
