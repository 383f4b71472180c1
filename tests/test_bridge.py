# SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause
"""The bridge end to end through real brokers: sensor -> edge (plugin) -> akenza stand-in and back."""
import json
import os
import random
import re
import shlex
import shutil
import signal
import time
from pathlib import Path

import pytest

from conftest import BUILD, disconnects, mosquitto_version, wait_for
from edge import Edge, check_acknowledged_arrived, counting_sensors



@pytest.fixture
def edge(brokers, tmp_path, standin, pki):
    """An edge broker (not yet started) bridged to the stand-in."""
    e = Edge(brokers, tmp_path / "edge", standin.port, pki.ca_cert)
    yield e


def up(device_id, sub=""):
    return f"/up/device/id/{device_id}{sub}"


def down(device_id, sub=""):
    return f"/down/device/id/{device_id}{sub}"


def start_with_devices(edge, standin, ids, **kw):
    for i in ids:
        pub = edge.add_device(i, password="pw-x", write=False)
        standin.register(i, pub)
    edge.write_registry()
    edge.start(**kw)
    admin = edge.admin()
    for i in ids:
        edge.wait_state(admin, i, "connected")
    return admin


def upstream_payloads(observer, topic):
    return [p for t, p in observer.received() if t == topic]


def last_summary(admin):
    """The newest $SYS/broker/akenza/summary the admin client got, as a dict ({} if none yet)."""
    for t, p in reversed(admin.received()):
        if t == "$SYS/broker/akenza/summary":
            return json.loads(p)
    return {}


@pytest.mark.parametrize("wakeup", ["signal", "tick"])
def test_uplink_downlink_round_trip(edge, standin, wakeup):
    edge.options["downlink_wakeup"] = wakeup
    admin = start_with_devices(edge, standin, ["dev-a"])
    obs = standin.observer()
    s = edge.sensor("dev-a")
    s.subscribe(down("dev-a", "/#"))

    s.publish(up("dev-a"), b'{"temperature":22}', qos=1)
    s.publish(up("dev-a", "/alerts"), b'{"alarm":true}', qos=0)
    wait_for(lambda: upstream_payloads(obs, up("dev-a")) == [b'{"temperature":22}'], 10,
             what="the QoS 1 uplink upstream")
    wait_for(lambda: upstream_payloads(obs, up("dev-a", "/alerts")) == [b'{"alarm":true}'], 10,
             what="the QoS 0 uplink on a sub-topic upstream")

    standin.publish_downlink("dev-a", b'{"cmd":"reboot"}', "/cmd")
    wait_for(lambda: (down("dev-a", "/cmd"), b'{"cmd":"reboot"}') in s.received(), 10,
             what="the downlink at the sensor")
    st = edge.status(admin, "dev-a")
    assert st["state"] == "connected"
    assert st["token_expires"] > time.time() + 1000
    assert re.fullmatch(r"[0-9a-f]{64}", st["kid"])
    # the stand-in verified a real token for this device
    assert "standin: accepted client 'dev-a'" in standin.log()


def test_downlink_burst_arrives_whole_and_in_order(edge, standin):
    """A burst of downlinks reaches the sensor whole: OpenSSL reads ahead (one read takes every
    record waiting) and libmosquitto reads a packet at a time, so records left in OpenSSL after a
    read, which epoll cannot see, would sit there until the next keepalive (60 s)."""
    start_with_devices(edge, standin, ["dev-b"])
    s = edge.sensor("dev-b")
    s.subscribe(down("dev-b", "/#"), qos=1)
    o = standin.observer("nothing/#")
    n = 600
    infos = [o.c.publish(down("dev-b", "/burst"), b"%d" % i, qos=1 if i % 2 else 0) for i in range(n)]
    infos[-1].wait_for_publish(30)

    def got():
        return [p for t, p in s.received() if t == down("dev-b", "/burst")]
    wait_for(lambda: len(got()) >= n, 20, what=f"{n} downlinks at the sensor")
    nums = [int(p) for p in got()]
    assert sorted(nums) == list(range(n)), "each downlink exactly once"
    # MQTT keeps order per QoS level (QoS 0 may overtake QoS 1 messages waiting for a slot)
    assert [i for i in nums if i % 2] == list(range(1, n, 2))
    assert [i for i in nums if not i % 2] == list(range(0, n, 2))

    # With the edge frozen, downlinks pile up in its socket: the first read after it wakes takes
    # them all (~12 KB, under OpenSSL's 16 KB read-ahead) as 200 records, more than one turn of
    # the bridge reads (the rest is read on the next turn, not at the next keepalive).
    pile = 200
    os.kill(edge.broker.proc.pid, signal.SIGSTOP)
    try:
        infos = [o.c.publish(down("dev-b", "/pile"), b"%d" % i, qos=0) for i in range(pile)]
        infos[-1].wait_for_publish(30)
        time.sleep(0.5)
    finally:
        os.kill(edge.broker.proc.pid, signal.SIGCONT)
    wait_for(lambda: len([1 for t, _ in s.received() if t == down("dev-b", "/pile")]) >= pile, 20,
             what=f"{pile} piled-up downlinks at the sensor")
    assert [int(p) for t, p in s.received() if t == down("dev-b", "/pile")] == list(range(pile))


def test_qos2_goes_up_as_qos1_and_order_is_kept(edge, standin):
    start_with_devices(edge, standin, ["dev-q"])
    obs = standin.observer()
    s = edge.sensor("dev-q")
    for i in range(200):
        s.c.publish(up("dev-q"), f"{i}".encode(), qos=2 if i % 3 == 0 else 1)
    wait_for(lambda: len(upstream_payloads(obs, up("dev-q"))) >= 200, 20, what="200 uplinks")
    assert upstream_payloads(obs, up("dev-q")) == [f"{i}".encode() for i in range(200)]
    assert all(q <= 1 for t, p, q in getattr(obs, "qos_log", []))


def test_a_device_cannot_speak_for_another(edge, standin):
    start_with_devices(edge, standin, ["dev-1", "dev-2"])
    obs = standin.observer()
    s = edge.sensor("dev-1")
    info = s.c.publish(up("dev-2"), b"spoof", qos=1)
    info.wait_for_publish(5)
    s.publish(up("dev-1"), b"mine")
    wait_for(lambda: upstream_payloads(obs, up("dev-1")) == [b"mine"], 10, what="own uplink")
    time.sleep(0.5)
    assert upstream_payloads(obs, up("dev-2")) == []


def test_token_refresh_three_times_without_loss(edge, standin):
    """Tokens of 60 s (the minimum) are refreshed three times while a sensor keeps publishing QoS 1:
    not one message is lost or refused, and the stand-in never has to kick an expired token."""
    edge.options["token_lifetime"] = "60"
    admin = start_with_devices(edge, standin, ["dev-t"])
    obs = standin.observer()
    s = edge.sensor("dev-t")
    sent = 0
    deadline = time.monotonic() + 200

    def accepted():
        return standin.log().count("standin: accepted client 'dev-t'")
    while accepted() < 4 and time.monotonic() < deadline:
        s.publish(up("dev-t"), f"{sent}".encode(), qos=1)
        sent += 1
        time.sleep(0.05)
    assert accepted() >= 4, "fewer than three token refreshes in 200 s"
    wait_for(lambda: len(upstream_payloads(obs, up("dev-t"))) >= sent, 30, what="every uplink")
    got = upstream_payloads(obs, up("dev-t"))
    # QoS 1 allows duplicates, not loss or reordering of first deliveries
    firsts = list(dict.fromkeys(got))
    assert firsts == [f"{i}".encode() for i in range(sent)]
    assert "expired: disconnecting" not in standin.log()
    # each refresh ended its connection with a DISCONNECT, not a bare close
    assert disconnects(standin.log(), "dev-t") >= 3
    assert disconnects(standin.log(), "dev-t", clean=False) == 0
    edge.wait_state(admin, "dev-t", "connected")


def test_upstream_outage_backoff_and_ordered_redelivery(edge, standin):
    admin = start_with_devices(edge, standin, ["dev-o"])
    s = edge.sensor("dev-o")
    standin.stop()
    edge.wait_state(admin, "dev-o", "backoff", timeout=30)
    for i in range(50):
        s.publish(up("dev-o"), f"{i}".encode(), qos=1)   # the edge acknowledges: queued
    st = edge.status(admin, "dev-o")
    assert st["state"] in ("backoff", "connecting")
    standin.start()
    edge.wait_state(admin, "dev-o", "connected", timeout=60)
    wait_for(lambda: len(standin.uplinks(up("dev-o"))) >= 50, 30, what="the queued uplinks")
    assert list(dict.fromkeys(standin.uplinks(up("dev-o")))) == [f"{i}".encode() for i in range(50)]


def test_unregistered_key_is_unauthorized(edge, standin):
    edge.add_device("dev-u")           # its public key is never registered upstream
    edge.start()
    admin = edge.admin()
    st = edge.wait_state(admin, "dev-u", "unauthorized", timeout=20)
    assert "refused" in st["last_error"]
    edge.broker.wait_log("public key with kid")
    line = [l for l in edge.broker.log().splitlines() if "public key with kid" in l][0]
    assert st["kid"] in line and "dev-u" in line
    # minutes, not seconds, before the next try
    time.sleep(3)
    assert standin.log().count("refused client 'dev-u'") == 1


@pytest.mark.parametrize("case", ["wrong_host", "other_ca"])
def test_upstream_certificate_is_verified(brokers, tmp_path, pki, standin_factory, case):
    """A stand-in with a certificate for another host, or from another CA, is refused before
    any token is sent."""
    if case == "wrong_host":
        key, cert = pki.server("evil", "evil.example", ["DNS:evil.example"])
    else:
        ca = pki.other_ca("rogue")
        key, cert = pki.server("rogue-server", "localhost", ["DNS:localhost", "IP:127.0.0.1"], ca=ca)
    bad = standin_factory(cert=cert, key=key, name=f"standin-{case}")
    e = Edge(brokers, tmp_path / "edge", bad.port, pki.ca_cert)
    pub = e.add_device("dev-c")
    bad.register("dev-c", pub)
    e.start()
    admin = e.admin()
    st = e.wait_state(admin, "dev-c", "backoff", timeout=20)
    assert "certificate verify failed" in st["last_error"], st
    time.sleep(1)
    log = bad.log()
    assert "dev-c" not in log, "a token reached a server that failed verification"


def test_tls_failure_after_a_connected_spell_still_names_its_reason(brokers, tmp_path, pki, standin_factory):
    """The reason a handshake failed reaches the device's status also when the device had been
    connected: libmosquitto's log (where OpenSSL's reason comes from) is switched off while a
    device is connected, because it formats a line for every packet, and must come back with
    each connect."""
    cert, key = tmp_path / "up.crt", tmp_path / "up.key"
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    s = standin_factory(cert=cert, key=key, name="standin-swap")
    e = Edge(brokers, tmp_path / "edge", s.port, pki.ca_cert)
    s.register("dev-s", e.add_device("dev-s"))
    e.start()
    admin = e.admin()
    e.wait_state(admin, "dev-s", "connected", timeout=20)
    accepted = s.log().count("accepted client 'dev-s'")
    rogue_key, rogue_cert = pki.server("rogue-swap", "localhost", ["DNS:localhost", "IP:127.0.0.1"],
                                       ca=pki.other_ca("rogue-swap-ca"))
    s.stop()
    shutil.copy(rogue_cert, cert)
    shutil.copy(rogue_key, key)
    s.start()
    topic = "$SYS/broker/akenza/devices/dev-s"

    def named():
        for t, p in reversed(admin.received()):
            if t == topic and p:
                return "certificate verify failed" in json.loads(p).get("last_error", "")
        return False
    wait_for(named, 20, what="the certificate failure named in dev-s's status")
    assert s.log().count("accepted client 'dev-s'") == accepted


def test_reload_adds_and_removes_devices_while_others_flow(edge, standin):
    admin = start_with_devices(edge, standin, ["keep", "gone"])
    obs = standin.observer()
    keeper = edge.sensor("keep")
    standin.register("new", edge.add_device("new", write=False))
    edge.remove_device("gone")     # writes the registry with "new" and without "gone"
    accepted_before = standin.log().count("accepted client 'keep'")
    edge.broker.sighup()
    edge.wait_state(admin, "new", "connected", timeout=20)
    wait_for(lambda: admin.received() and any(t.endswith("/gone") and p == b"" for t, p in admin.received()),
             10, what="the removed device's status cleared")
    n = edge.sensor("new")
    n.publish(up("new"), b"hello")
    keeper.publish(up("keep"), b"still here")
    wait_for(lambda: upstream_payloads(obs, up("new")) == [b"hello"], 10, what="new device's uplink")
    wait_for(lambda: upstream_payloads(obs, up("keep")) == [b"still here"], 10, what="kept device's uplink")
    # the kept device's upstream connection was not disturbed
    assert standin.log().count("accepted client 'keep'") == accepted_before
    edge.broker.wait_log("device 'gone' left the bridge")


def name_server(tmp_path, delay_ms):
    """The edge's environment for tests/shims/slow_dns.c: every getaddrinfo() takes delay_ms,
    is logged to the returned file, and fails while `fail` exists."""
    log, fail = tmp_path / "dns.log", tmp_path / "dns.fail"
    env = {"LD_PRELOAD": str(BUILD / "slow_dns.so"), "AKZ_DNS_DELAY_MS": str(delay_ms),
           "AKZ_DNS_LOG": str(log), "AKZ_DNS_FAIL": str(fail)}
    return env, log, fail


def lookups(log):
    return log.read_text().split().count("localhost") if log.exists() else 0


def test_slow_name_server_does_not_hold_up_the_bridge(edge, standin, tmp_path):
    """Each lookup of the upstream's name takes 1.5 s: devices connect after one lookup, not one
    each (libmosquitto's connect would look the name up on the bridge thread, 1.5 s per device),
    and a connected device's uplinks flow while later lookups are under way."""
    env, log, _ = name_server(tmp_path, 1500)
    ids = [f"dns{i:02d}" for i in range(20)]
    edge.options.update({"connect_rate": "1000", "upstream_dns_refresh": "1"})
    for i in ids:
        standin.register(i, edge.add_device(i, write=False))
    edge.write_registry()
    t0 = time.monotonic()
    edge.start(env=env)
    admin = edge.admin()
    for i in ids:
        edge.wait_state(admin, i, "connected", timeout=12)
    took = time.monotonic() - t0
    assert took < 10, f"20 devices took {took:.1f} s to connect"   # 30 s with a lookup each
    assert lookups(log) <= 2 + took / 1.5, log.read_text()
    # Lookups go on every second (upstream_dns_refresh 1) while uplinks are relayed at once.
    obs = standin.observer()
    s = edge.sensor(ids[0])
    before = lookups(log)
    for k in range(30):
        s.publish(up(ids[0]), f"{k}".encode(), qos=1)
        wait_for(lambda: len(upstream_payloads(obs, up(ids[0]))) == k + 1, 1.0, interval=0.01,
                 what=f"uplink {k} upstream within 1 s")
        time.sleep(0.1)
    assert lookups(log) > before, "no lookup ran while uplinks flowed"
    s.close()


def test_name_server_down_upstream_up(edge, standin, tmp_path):
    """The name server fails while akenza is reachable: devices that lose their connection come
    back on the address looked up before."""
    env, log, fail = name_server(tmp_path, 0)
    edge.options.update({"upstream_dns_refresh": "1"})
    admin = start_with_devices(edge, standin, ["dev-n"], env=env)
    fail.touch()
    time.sleep(1.5)                      # a refresh has failed by now
    standin.stop()
    edge.wait_state(admin, "dev-n", "backoff", timeout=30)
    standin.start()
    edge.wait_state(admin, "dev-n", "connected", timeout=30)
    assert lookups(log) >= 2
    obs = standin.observer()
    s = edge.sensor("dev-n")
    s.publish(up("dev-n"), b"still here", qos=1)
    wait_for(lambda: upstream_payloads(obs, up("dev-n")) == [b"still here"], 10, what="the uplink upstream")
    s.close()


def test_name_that_does_not_resolve_yet(edge, standin, tmp_path):
    """At start the name server fails: the device waits in backoff with the lookup's error as
    its last_error, and connects once the name resolves (the lookup is retried every 5 s)."""
    env, log, fail = name_server(tmp_path, 0)
    fail.touch()
    pub = edge.add_device("dev-r", password="pw-x", write=False)
    standin.register("dev-r", pub)
    edge.write_registry()
    edge.start(env=env)
    admin = edge.admin()
    st = edge.wait_state(admin, "dev-r", "backoff")
    assert st["last_error"].startswith("cannot resolve 'localhost': "), st
    fail.unlink()
    edge.wait_state(admin, "dev-r", "connected", timeout=20)
    assert lookups(log) >= 2


def test_server_name_indication_names_the_host(edge, pki, tmp_path):
    """The bridge connects to the address it looked up, and still tells the server its name in
    SNI (which a load balancer in front of akenza routes on), not the address."""
    import socket
    import ssl
    import threading
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    names = []
    ctx.sni_callback = lambda sock, name, c: names.append(name)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(20)
    edge.options["upstream_port"] = str(srv.getsockname()[1])

    def accept_one():
        try:
            conn, _ = srv.accept()
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except OSError:
            pass
    t = threading.Thread(target=accept_one, daemon=True)
    t.start()
    edge.add_device("dev-s")
    edge.start()
    t.join(25)
    srv.close()
    assert names and names[0] == "localhost", names


def test_outage_log_is_a_line_per_device_and_a_summary_a_minute(edge, monkeypatch):
    """With akenza unreachable every device retries every few seconds, for days maybe: at the log
    level of a deployed broker the log says once per device that it is in backoff, and once a
    minute how many are out, not a line per attempt. (Slow lane: waits for the summary.)"""
    import socket
    import threading
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    srv.settimeout(0.5)
    attempts = []
    done = threading.Event()

    def refuse_all():   # accepts and hangs up: a TLS failure at every attempt
        while not done.is_set():
            try:
                conn, _ = srv.accept()
                attempts.append(1)
                conn.close()
            except OSError:
                pass
    t = threading.Thread(target=refuse_all, daemon=True)
    t.start()
    monkeypatch.setenv("AKZ_LOG_TYPES", "error warning notice information")
    edge.options["upstream_port"] = str(srv.getsockname()[1])
    ids = [f"out{i}" for i in range(5)]
    for i in ids:
        edge.add_device(i, write=False)
    edge.write_registry()
    try:
        edge.start()
        edge.broker.wait_log("5 of 5 devices not connected", timeout=90)
    finally:
        done.set()
        t.join(5)
        srv.close()
    log = edge.broker.log()
    assert len(attempts) >= 5 * 4, f"only {len(attempts)} attempts"
    # A line for the first failure of each device, not one per attempt (the reasons alternate:
    # a hang-up shows as EOF or as a TLS error).
    for i in ids:
        assert log.count(f"device '{i}': backoff") == 1, log
    assert re.search(r"5 of 5 devices not connected \(\d+ in backoff, 0 unauthorized, \d+ connecting, "
                     r"0 disabled\); \d+ failed attempts in the last minute, the newest: device 'out\d': ", log), log


FAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"


@pytest.mark.skipif(bool(os.environ.get("AKZ_BROKER_PRELOAD")),
                    reason="libfaketime does not share a process with a sanitizer runtime (the broker hangs at start)")
def test_clock_step_lets_refused_devices_retry_at_once(edge, standin, tmp_path):
    """An edge whose clock runs 2 h fast mints tokens that akenza takes as future-dated: the
    device is refused and waits a minute or more to ask again. When NTP steps the clock back,
    it asks again at once, with a token minted on the right time."""
    clock = tmp_path / "clock"
    clock.write_text("+2h\n")
    env = {"LD_PRELOAD": FAKETIME, "FAKETIME_TIMESTAMP_FILE": str(clock),
           "FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_CACHE_DURATION": "1"}
    pub = edge.add_device("dev-c", password="pw-x", write=False)
    standin.register("dev-c", pub)
    edge.write_registry()
    edge.start(env=env)
    admin = edge.admin()
    edge.wait_state(admin, "dev-c", "unauthorized")
    assert "refused client 'dev-c': iat in the future" in standin.log()
    clock.write_text("+0\n")   # NTP steps the clock back
    edge.broker.wait_log("the wall clock stepped by -7")
    edge.wait_state(admin, "dev-c", "connected", timeout=10)   # not after the 30-60 s retry wait
    obs = standin.observer()
    s = edge.sensor("dev-c")
    s.publish(up("dev-c"), b"on time", qos=1)
    wait_for(lambda: upstream_payloads(obs, up("dev-c")) == [b"on time"], 10, what="the uplink upstream")
    s.close()


def test_status_is_published_while_the_broker_sleeps(edge, standin):
    """Mosquitto 2.1 built without websockets sleeps until its next event (here its keepalive
    check, every 5 s while clients are connected; the $SYS update is a minute away), not at most
    100 ms as 2.0 does: a device state the bridge thread changed waits for a TICK all the same. The plugin's heartbeat wakes the broker
    when no TICK ran for 150 ms. (2.0 and 2.1 with websockets turn every 100 ms on their own.)"""
    edge.extra = "sys_interval 60\n"
    admin = start_with_devices(edge, standin, ["dev-h"])   # subscribed to the device's status
    topic = "$SYS/broker/akenza/devices/dev-h"

    def state():
        for t, p in reversed(admin.received()):
            if t == topic and p:
                return json.loads(p)["state"]
    standin.kill()
    # No client sends anything meanwhile: 2.1's next event is its keepalive check, up to 5 s away
    wait_for(lambda: state() == "backoff", 2, what="the backoff status")
    admin.close()


def test_per_listener_settings_is_reported(edge, standin):
    """Mosquitto 2.0 never calls TICK with per_listener_settings true: uplinks still go out, the
    log says why downlinks and status cannot, and the bridge's own log lines still appear.
    2.1 calls the TICK of a plugin loaded per listener too (src/plugin_tick.c), so there the
    status is published and nothing is reported."""
    pub = edge.add_device("dev-p", password="pw-x", write=False)
    standin.register("dev-p", pub)
    edge.write_registry()
    conf = edge.conf
    edge.conf = lambda: "per_listener_settings true\n" + conf()
    edge.start()
    obs = standin.observer()
    wait_for(lambda: "accepted client 'dev-p'" in standin.log(), 10, what="dev-p upstream")
    time.sleep(2.2)   # the plugin waits 2 s for a first TICK
    s = edge.sensor("dev-p")
    s.publish(up("dev-p"), b"42", qos=1)
    wait_for(lambda: upstream_payloads(obs, up("dev-p")) == [b"42"], 10, what="the uplink upstream")
    if mosquitto_version() >= (2, 1, 0):
        admin = edge.admin()
        edge.wait_state(admin, "dev-p", "connected")   # published from the TICK
        assert "has not called the plugin's TICK" not in edge.broker.log()
        admin.close()
        s.close()
        return
    edge.broker.wait_log("has not called the plugin's TICK since it started")
    edge.broker.wait_log("device 'dev-p': connected")   # written out without a TICK
    assert edge.broker.log().count("has not called the plugin's TICK") == 1
    s.close()


def test_a_removed_device_leaves_without_a_tick(edge, standin):
    """A device that leaves the registry is freed by the bridge thread as soon as it takes the
    news, not after a TICK of the broker's: with per_listener_settings true Mosquitto 2.0 calls no
    TICK, and the removed device's upstream connection still closes."""
    for i in ("keep-t", "gone-t"):
        standin.register(i, edge.add_device(i, password="pw-x", write=False))
    edge.write_registry()
    conf = edge.conf
    edge.conf = lambda: "per_listener_settings true\n" + conf()
    edge.start()
    wait_for(lambda: "accepted client 'gone-t'" in standin.log(), 10, what="gone-t upstream")
    edge.remove_device("gone-t")
    edge.broker.sighup()
    wait_for(lambda: disconnects(standin.log(), "gone-t", clean=False), 10,
             what="gone-t's upstream connection closed")
    assert disconnects(standin.log(), "keep-t", clean=False) == 0


def test_two_hundred_devices(edge, standin):
    ids = [f"d{i:03d}" for i in range(200)]
    edge.options["connect_rate"] = "1000"
    for i in ids:
        standin.register(i, edge.add_device(i, write=False))
    edge.write_registry()
    # Started as systemd would start it, with a low soft open-file limit: the plugin raises it to
    # what 200 devices and their sensors need (200 upstream + 200 local + 256 to spare).
    wrapper = ["prlimit", "--nofile=300:"] + shlex.split(os.environ.get("AKZ_BROKER_WRAPPER", ""))
    edge.start(wrapper=wrapper)
    admin = edge.admin()
    admin.subscribe("$SYS/broker/akenza/summary", 0)
    wait_for(lambda: last_summary(admin).get("connected") == 200, 60, what="200 devices connected")
    edge.broker.wait_log("raised the open-file limit from 300 to 656 for 200 devices")
    limits = Path(f"/proc/{edge.broker.proc.pid}/limits").read_text()
    assert re.search(r"Max open files\s+656\s", limits), limits
    # One descriptor per device upstream: libmosquitto's per-client socket pair is closed.
    fds = len(os.listdir(f"/proc/{edge.broker.proc.pid}/fd"))
    assert fds < 200 + 50, f"{fds} descriptors open for 200 devices"
    # The first connection leaves a TLS session the others resume: one full handshake, not 200.
    st = wait_for(lambda: last_summary(admin).get("connects") == 200 and last_summary(admin), 10,
                  what="200 connects")
    assert st["tls_resumed"] >= 190, st
    obs = standin.observer()
    sensors = [edge.sensor(i) for i in ids[:20]]
    for k, s in enumerate(sensors):
        s.publish(up(ids[k]), b"x")
    for k in range(20):
        wait_for(lambda: upstream_payloads(obs, up(ids[k])) == [b"x"], 10, what=f"uplink of {ids[k]}")
    for s in sensors:
        s.close()


def test_tight_open_file_limit_is_told_once_per_change(edge, standin):
    """A hard open-file limit below what the devices need is reported, but not again at every
    reload that changes nothing; adding a device (new numbers) reports it again."""
    ids = [f"f{i:02d}" for i in range(60)]
    for i in ids:
        edge.add_device(i, write=False)
    edge.write_registry()
    edge.start(wrapper=["prlimit", "--nofile=200:200"] + shlex.split(os.environ.get("AKZ_BROKER_WRAPPER", "")))
    warning = "the open-file limit (200) is below the 316 that the upstream connections of 60 devices need"
    edge.broker.wait_log(warning)
    for n in (1, 2):
        edge.broker.sighup()
        wait_for(lambda: edge.broker.log().count("akenza: reloaded") >= n, 20, what=f"reload {n}")
    assert edge.broker.log().count(warning) == 1
    edge.add_device("f60")
    edge.broker.sighup()
    edge.broker.wait_log("below the 317 that the upstream connections of 61 devices need")



def test_stalled_upstream_large_uplinks_arrive_whole_and_in_order(edge, standin):
    """The stand-in stops reading (SIGSTOP) while a sensor sends QoS 1 uplinks far larger than
    the sockets take: the bridge's writes wait for the socket (its write buffer full, records
    larger than the buffer written in parts) and, once the stand-in runs again, every uplink
    arrives whole and in order, on the same connection."""
    admin = start_with_devices(edge, standin, ["dev-big"])
    accepted = standin.log().count("accepted client 'dev-big'")
    s = edge.sensor("dev-big")
    # ~6 MB in flight (32 uplinks at once), beyond what the edge's socket and the stopped
    # stand-in's take (tcp_wmem's 4 MB ceiling), so that writes must wait for EPOLLOUT
    sizes = [(700 if i % 4 == 0 else 250_000) + i for i in range(60)]
    payloads = [os.urandom(n) for n in sizes]
    os.kill(standin.broker.proc.pid, signal.SIGSTOP)
    try:
        for p in payloads:
            s.publish(up("dev-big"), p, qos=1)    # the edge acknowledges: queued or in flight
        time.sleep(2)
        assert edge.status(admin, "dev-big")["state"] == "connected"
    finally:
        os.kill(standin.broker.proc.pid, signal.SIGCONT)
    wait_for(lambda: len(standin.uplinks(up("dev-big"))) >= len(payloads), 60, what="every large uplink")
    got = list(dict.fromkeys(standin.uplinks(up("dev-big"))))
    assert [len(p) for p in got] == sizes
    assert got == payloads
    assert standin.log().count("accepted client 'dev-big'") == accepted, "the connection was replaced"
    edge.wait_state(admin, "dev-big", "connected")


def test_flapping_upstream_loses_nothing_acknowledged(edge, standin):
    """The upstream dies (SIGKILL) or stalls (SIGSTOP) eight times in 40 s, at seeded random
    moments and for 0.3-2.5 s, while 20 devices publish QoS 1 at 500 msg/s in total: every uplink
    the edge acknowledged arrives, in order per device (duplicates allowed, as QoS 1 does). Each
    kill finds uplinks in every state: queued, in a device's write buffer, written and not
    acknowledged, acknowledged by akenza and not yet counted."""
    rng = random.Random(20261126)
    ids = [f"fp{i:02d}" for i in range(20)]
    admin = start_with_devices(edge, standin, ids)
    sensors, sent, acked = counting_sensors(edge.port, ids, inflight=200)
    events, t = [], 3.0
    for _ in range(8):
        events.append((t, rng.choice(["kill", "stop"]), rng.uniform(0.3, 2.5)))
        t += rng.uniform(2.5, 4.5)
    pid = standin.broker.proc.pid
    seq, t0, ev, down_until, how = 0, time.monotonic(), 0, None, None
    try:
        while time.monotonic() - t0 < 40:
            now = time.monotonic() - t0
            if down_until is None and ev < len(events) and now >= events[ev][0]:
                how = events[ev][1]
                if how == "kill":
                    standin.kill()
                else:
                    os.kill(pid, signal.SIGSTOP)
                down_until = now + events[ev][2]
                ev += 1
            elif down_until is not None and now >= down_until:
                if how == "kill":
                    standin.start()
                    pid = standin.broker.proc.pid
                else:
                    os.kill(pid, signal.SIGCONT)
                down_until = None
            for i in ids:                      # 20 uplinks every 40 ms: 500 msg/s
                info = sensors[i].c.publish(up(i), f"{seq}".encode(), qos=1)
                sent[i][info.mid] = seq
            seq += 1
            time.sleep(max(0.0, t0 + seq * 0.04 - time.monotonic()))
    finally:
        if down_until is not None:
            if how == "kill":
                standin.start()
            else:
                os.kill(pid, signal.SIGCONT)
    assert ev == len(events)
    dups = check_acknowledged_arrived(standin, sent, acked, up)
    print(f"\n  flapping upstream: {sum(len(v) for v in sent.values())} uplinks, all delivered, {dups} duplicates")
    for i in ids:
        edge.wait_state(admin, i, "connected", timeout=60)
    for s in sensors.values():
        s.close()


def bridge_writes(edge):
    """Write syscalls of the edge's bridge thread so far (its name is "akz bridge"), from
    /proc/PID/task/TID/io: the bridge thread writes nothing but its upstream connections."""
    for task in Path(f"/proc/{edge.broker.proc.pid}/task").iterdir():
        if (task / "comm").read_text().strip() == "akz bridge":
            return int(re.search(r"syscw: (\d+)", (task / "io").read_text()).group(1))
    raise AssertionError("no bridge thread")


def test_a_loop_turns_uplinks_leave_in_one_write(edge, standin):
    """The batching rule: a device's uplinks that reach the bridge thread in one loop turn leave
    in one write, up to the free window. 3,000 QoS 1 uplinks queued while akenza stalls go out in
    far fewer writes than uplinks, whole and in order, once it runs again (a write per uplink
    fails this); a quiet device's uplink is not held back for company."""
    edge.options["queue_max"] = "10000"
    start_with_devices(edge, standin, ["bt-1"])
    s = edge.sensor("bt-1")
    time.sleep(0.5)
    n = 3000
    # akenza stalls: the window fills and the rest queues at the edge, which acknowledges them
    os.kill(standin.broker.proc.pid, signal.SIGSTOP)
    try:
        for i in range(n):
            info = s.c.publish(up("bt-1", "/burst"), f"b{i}".encode(), qos=1)
        info.wait_for_publish(30)
        before = bridge_writes(edge)
    finally:
        os.kill(standin.broker.proc.pid, signal.SIGCONT)
    wait_for(lambda: len(standin.uplinks(up("bt-1", "/burst"))) >= n, 30, interval=0.005, what="the burst")
    writes = bridge_writes(edge) - before
    assert list(dict.fromkeys(standin.uplinks(up("bt-1", "/burst")))) == [f"b{i}".encode() for i in range(n)]
    waits = []
    for i in range(5):
        time.sleep(0.3)
        t0 = time.monotonic()
        s.publish(up("bt-1", "/quiet"), f"q{i}".encode(), qos=0)
        wait_for(lambda: f"q{i}".encode() in standin.uplinks(up("bt-1", "/quiet")), 5, interval=0.002,
                 what=f"quiet uplink {i}")
        waits.append(time.monotonic() - t0)
    print(f"\n  burst: {writes} writes for {n} uplinks; quiet waits {[round(w * 1000, 1) for w in waits]} ms")
    assert writes < n // 4, f"{writes} writes for {n} queued uplinks: not a loop turn's uplinks per write"
    assert sorted(waits)[2] < 0.025, f"a quiet device's uplinks waited {waits} s"

