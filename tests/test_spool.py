# SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause
"""The durable spool through real brokers: outages, restarts, SIGKILL, full spools, torn and corrupt
segments, TTL, receipts, and the size of the spool on disk under steady traffic."""
import json
import struct
import threading
import time
import zlib
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes
import pytest

from conftest import mosquitto_version, wait_for
from edge import Edge, Sensor, check_acknowledged_arrived, counting_sensors


def up(device_id, sub=""):
    return f"/up/device/id/{device_id}{sub}"


@pytest.fixture
def edge(brokers, tmp_path, standin, pki):
    e = Edge(brokers, tmp_path / "edge", standin.port, pki.ca_cert)
    e.spool = tmp_path / "edge" / "spool"
    e.options["spool_dir"] = str(e.spool)
    yield e


def register(edge, standin, ids, upstream=True):
    for i in ids:
        pub = edge.add_device(i, password="pw-x", write=False)
        if upstream:
            standin.register(i, pub)
    edge.write_registry()


def firsts(seq):
    """The first deliveries in order (QoS 1 allows duplicates, not loss or reordering)."""
    return list(dict.fromkeys(seq))


def summary(edge, admin, pred=lambda s: True, timeout=20):
    topic = "$SYS/broker/akenza/summary"
    admin.subscribe(topic, 0)

    def latest():
        for t, p in reversed(admin.received()):
            if t == topic and p:
                s = json.loads(p)
                return s if pred(s) else None
        return None
    return wait_for(latest, timeout, what="a matching summary")


def segments(spool):
    return sorted(Path(spool).glob("*.seg"))


def spool_size(spool):
    return sum(p.stat().st_size for p in segments(spool))


def test_backlog_survives_a_clean_restart_in_order_without_duplicates(edge, standin):
    register(edge, standin, ["sp-a"])
    standin.stop()
    edge.start()
    s = edge.sensor("sp-a")
    for i in range(300):
        s.publish(up("sp-a"), f"{i}".encode(), qos=1)     # PUBACKed: on disk now
    s.close()
    edge.broker.stop()
    assert "they stay in the spool" in edge.broker.log()
    assert spool_size(edge.spool) > 300 * 40
    standin.start()
    edge.broker.start()
    edge.broker.wait_log("300 undelivered uplinks")
    wait_for(lambda: len(standin.uplinks(up("sp-a"))) >= 300, 30, what="300 replayed uplinks")
    time.sleep(0.5)
    assert standin.uplinks(up("sp-a")) == [f"{i}".encode() for i in range(300)]
    admin = edge.admin()
    st = summary(edge, admin, lambda s: s["spool_msgs"] == 0 and s["uplinks"] == 300)
    assert st["spool_replayed"] == 300 and st["queued"] == 0
    # delivered segments are reclaimed: only the active one (and a marker or two) is left
    wait_for(lambda: len(segments(edge.spool)) == 1, 10, what="delivered segments deleted")


def test_sigkill_with_sync_always_loses_nothing_acknowledged(edge, standin):
    """The edge is SIGKILLed mid-stream with spool_sync always: every message a sensor got a
    PUBACK for reaches akenza after the restart (duplicates allowed, counted as replayed)."""
    edge.options["spool_sync"] = "always"
    register(edge, standin, ["sp-k"])
    edge.start()
    admin = edge.admin()
    edge.wait_state(admin, "sp-k", "connected")
    acked = []
    s = Sensor(edge.port, "sp-k", "pw-x")
    s.c.on_publish = lambda c, u, mid: acked.append(mid)
    assert s.connect() == 0
    mids = {}
    stop_at = [None]

    def publisher():
        for i in range(5000):
            if stop_at[0] is not None:
                return
            info = s.c.publish(up("sp-k"), f"{i}".encode(), qos=1)
            mids[info.mid] = i
            if i == 1500:
                # The upstream dies: a backlog builds up as well as messages in flight.
                standin.kill()
            time.sleep(0.0005)
    t = threading.Thread(target=publisher)
    t.start()
    wait_for(lambda: len(acked) >= 2500, 60, what="2500 PUBACKs from the edge")
    edge.broker.kill()                  # SIGKILL: no clean stop, no final sync
    stop_at[0] = True
    t.join(30)
    time.sleep(0.3)
    s.c.loop_stop()
    acknowledged = sorted(mids[m] for m in list(acked) if m in mids)
    assert len(acknowledged) >= 2500
    standin.start()
    edge.broker.start()
    want = [f"{i}".encode() for i in acknowledged]

    def upstream():
        return standin.uplinks(up("sp-k"))
    wait_for(lambda: set(want) <= set(upstream()), 60,
             what="every acknowledged uplink upstream after the restart")
    got = firsts(upstream())
    # in order: what arrived after the restart continues the device's sequence
    nums = [int(p) for p in got]
    assert nums == sorted(nums), "uplinks reordered across the crash"
    admin = edge.admin()
    st = summary(edge, admin, lambda s: s["spool_msgs"] == 0)
    assert st["spool_replayed"] >= 1


def test_a_full_spool_refuses_publishers_without_loss_then_drains(edge, standin):
    edge.options["spool_device_max_bytes"] = "8192"   # about 100 uplinks of this size
    register(edge, standin, ["sp-f"])
    standin.stop()
    edge.start()
    admin = edge.admin()
    # MQTT 5: the refusal is a failure reason code in the PUBACK; the client keeps the message
    v5 = Sensor(edge.port, "sp-f", "pw-x", protocol=mqtt.MQTTv5)
    v5.c.on_publish = lambda c, u, mid: None
    assert v5.connect() == 0
    for i in range(300):
        info = v5.c.publish(up("sp-f"), f"{i:05d}".encode() + b"x" * 20, qos=1)
        info.wait_for_publish(5)
        # paho 1.6 does not surface the PUBACK reason; the broker log and counters do
    edge.broker.wait_log("refusing uplink from client")
    st = summary(edge, admin, lambda s: s["refused"] > 0)
    assert 50 <= st["spool_msgs"] <= 130, st
    held = st["spool_msgs"]
    assert "its share of the spool" in edge.broker.log()
    if mosquitto_version() >= (2, 1, 0):   # 2.0 answers 0x87 whatever the plugin asks for
        assert "Rejected PUBLISH from sensor-sp-f" in edge.broker.log()   # 2.1's line for 0x97 "quota exceeded"
    # MQTT 3.1.1: disconnected without a PUBACK, so the client keeps the message
    old = Sensor(edge.port, "sp-f", "pw-x", clean=False, client_id="sp-f-311")
    assert old.connect() == 0
    info = old.c.publish(up("sp-f"), b"kept-by-client", qos=1)
    time.sleep(1.0)
    assert not info.is_published()
    # the error number each release reads as "administrative action" (30 in 2.0, 152 in 2.1)
    edge.broker.wait_log("administrative action")
    old.c.loop_stop()
    # upstream returns: the backlog drains and the spool takes uplinks again
    standin.start()
    wait_for(lambda: len(standin.uplinks(up("sp-f"))) >= held, 60, what="the backlog upstream")
    arrived = firsts(standin.uplinks(up("sp-f")))
    assert arrived[:held] == [f"{i:05d}".encode() + b"x" * 20 for i in range(held)]
    summary(edge, admin, lambda s: s["spool_msgs"] == 0, timeout=30)
    again = edge.sensor("sp-f")
    again.publish(up("sp-f"), b"after", qos=1)
    wait_for(lambda: b"after" in standin.uplinks(up("sp-f")), 20, what="a new uplink after the drain")
    v5.close()


def _records(data):
    """(offset, length) of each record of a segment file."""
    off, out = 16, []
    while off + 32 <= len(data):
        n = 32 + struct.unpack_from("<I", data, off + 4)[0]
        out.append((off, n))
        off += n
    return out


def test_torn_record_is_cut_off_and_corrupt_segment_set_aside(edge, standin):
    edge.options["spool_segment_bytes"] = "4096"
    register(edge, standin, ["sp-t"])
    standin.stop()
    edge.start()
    s = edge.sensor("sp-t")
    for i in range(200):
        s.publish(up("sp-t"), f"{i:04d}".encode() + b"." * 40, qos=1)
    s.close()
    edge.broker.stop()
    segs = segments(edge.spool)
    assert len(segs) >= 4, segs
    # a corrupt byte in the middle of the second segment, a torn record at the end of the last
    victim = segs[1]
    data = bytearray(victim.read_bytes())
    recs = _records(bytes(data))
    bad_off, _ = recs[len(recs) // 2]
    data[bad_off + 40] ^= 0xFF
    victim.write_bytes(bytes(data))
    lost = len(recs) - len(recs) // 2
    last = [p for p in segs if _records(p.read_bytes())][-1]
    good = last.read_bytes()
    body = b"sp-t" + b"/up/device/id/sp-t" + b"torn"
    hdr = struct.pack("<IBBHHHQq", len(body), 1, 1, 4, 18, 0, 999999, int(time.time()))
    crc = zlib.crc32(hdr + body)
    last.write_bytes(good + struct.pack("<I", crc) + hdr + body[:10])   # cut short mid-body
    standin.start()
    edge.broker.start()
    log = edge.broker.wait_log("set aside as")
    log = edge.broker.log()
    assert "checksum mismatch" in log and "cut off" in log
    assert Path(str(victim) + ".corrupt").exists()
    wait_for(lambda: len(standin.uplinks(up("sp-t"))) >= 200 - lost, 30, what="the readable uplinks")
    time.sleep(0.5)
    got = [int(p[:4]) for p in standin.uplinks(up("sp-t"))]
    assert got == sorted(got) and len(got) == len(set(got))
    assert len(got) >= 200 - lost and b"torn" not in b"".join(standin.uplinks(up("sp-t")))
    # the broker is healthy and keeps relaying
    s2 = edge.sensor("sp-t")
    s2.publish(up("sp-t"), b"9999 after recovery", qos=1)
    wait_for(lambda: b"9999 after recovery" in standin.uplinks(up("sp-t")), 20, what="a new uplink")


def test_spool_size_stays_bounded_under_steady_traffic_and_a_stuck_device(edge, standin):
    """A day at a low rate compressed: thousands of uplinks flow while one device whose key akenza
    does not know keeps a backlog; the files hold the backlog, not the traffic."""
    edge.options["spool_segment_bytes"] = "8192"
    register(edge, standin, ["sp-d"])
    register(edge, standin, ["sp-stuck"], upstream=False)
    edge.start()
    admin = edge.admin()
    edge.wait_state(admin, "sp-d", "connected")
    stuck = edge.sensor("sp-stuck")
    for i in range(20):
        stuck.publish(up("sp-stuck"), f"stuck {i}".encode(), qos=1)
    s = edge.sensor("sp-d")
    sizes = []
    for i in range(4000):
        s.c.publish(up("sp-d"), f"{i} {'v' * 60}".encode(), qos=1)
        if i % 500 == 499:
            wait_for(lambda: len(standin.uplinks(up("sp-d"))) >= i + 1, 30, what=f"{i + 1} uplinks")
            time.sleep(1.3)   # a reclaim pass
            sizes.append(spool_size(edge.spool))
    traffic = 4000 * 110
    assert max(sizes) < 6 * 8192 + 4096, (sizes, traffic)
    st = summary(edge, admin, lambda s: s["spool_msgs"] == 20)
    assert st["spool_bytes"] < 20 * 100
    # the stuck device's backlog survived compaction, in order
    edge.broker.stop()
    standin.register("sp-stuck", edge.keys / "sp-stuck.pub.pem")
    edge.broker.start()
    wait_for(lambda: len(standin.uplinks(up("sp-stuck"))) >= 20, 60, what="the stuck backlog")
    assert firsts(standin.uplinks(up("sp-stuck"))) == [f"stuck {i}".encode() for i in range(20)]


def test_ttl_expires_old_uplinks_with_a_log_line_and_a_counter(edge, standin):
    edge.options["spool_ttl"] = "2"
    register(edge, standin, ["sp-e"])
    standin.stop()
    edge.start()
    admin = edge.admin()
    s = edge.sensor("sp-e")
    for i in range(5):
        s.publish(up("sp-e"), f"old {i}".encode(), qos=1)
    edge.broker.wait_log("5 uplinks older than plugin_opt_spool_ttl (2 s) dropped", timeout=15)
    st = summary(edge, admin, lambda s: s["expired"] == 5)
    assert st["spool_msgs"] == 0
    standin.start()
    edge.wait_state(admin, "sp-e", "connected", timeout=60)
    s.publish(up("sp-e"), b"new", qos=1)
    wait_for(lambda: standin.uplinks(up("sp-e")) == [b"new"], 20, what="only the fresh uplink")


def test_receipts_carry_correlation_data_or_sequence(edge, standin):
    edge.options["receipts"] = "true"
    register(edge, standin, ["sp-r"])
    edge.acl.write_text(edge.acl.read_text())
    edge.start()
    admin = edge.admin()
    edge.wait_state(admin, "sp-r", "connected")
    got = []
    c = mqtt.Client(client_id="sp-r-v5", protocol=mqtt.MQTTv5)
    c.username_pw_set("sp-r", "pw-x")
    c.on_message = lambda cl, u, m: got.append(m)
    subscribed = threading.Event()
    c.on_subscribe = lambda *a: subscribed.set()
    c.connect("127.0.0.1", edge.port)
    c.loop_start()
    c.subscribe("akenza/receipts/sp-r", 1)
    assert subscribed.wait(10)
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = b"req-42"
    c.publish(up("sp-r"), b"with-corr", qos=1, properties=props).wait_for_publish(10)
    c.publish(up("sp-r"), b"no-corr", qos=1).wait_for_publish(10)
    wait_for(lambda: len(got) >= 2, 20, what="two receipts")
    first, second = got[0], got[1]
    assert getattr(first.properties, "CorrelationData", None) == b"req-42"
    body = json.loads(second.payload)
    assert body["seq"] == json.loads(first.payload)["seq"] + 1 and body["topic"] == up("sp-r")
    assert not hasattr(second.properties, "CorrelationData")
    c.loop_stop()
    c.disconnect()


def test_backlog_of_a_removed_device_is_kept_and_reported(edge, standin):
    register(edge, standin, ["sp-o", "sp-keep"])
    standin.stop()
    edge.start()
    s = edge.sensor("sp-o")
    for i in range(7):
        s.publish(up("sp-o"), f"{i}".encode(), qos=1)
    s.close()
    entry = next(d for d in edge.devices if d["id"] == "sp-o")
    edge.remove_device("sp-o")
    edge.broker.sighup()
    edge.broker.wait_log("the spool keeps them until it comes back")
    edge.broker.stop()
    edge.broker.start()
    edge.broker.wait_log("spool holds 7 undelivered uplinks")
    assert "of device 'sp-o', which is not in the registry: kept" in edge.broker.log()
    # back in the registry: its uplinks go out
    standin.start()
    edge.devices.append(entry)
    edge.write_registry()
    edge.broker.sighup()
    wait_for(lambda: len(standin.uplinks(up("sp-o"))) >= 7, 60, what="the kept backlog upstream")
    assert firsts(standin.uplinks(up("sp-o"))) == [f"{i}".encode() for i in range(7)]


def test_bad_spool_options_are_refused_with_the_option_named(edge, standin):
    edge.options["spool_sync"] = "sometimes"
    edge.options["spool_max_bytes"] = "12"
    register(edge, standin, ["sp-x"])
    edge.start(expect_start=False)
    log = edge.broker.log()
    assert "plugin_opt_spool_sync: 'sometimes' is not always, batch or none" in log
    assert "plugin_opt_spool_max_bytes: 12 is outside" in log


def test_fifty_devices_at_1000_msgs_per_second_through_a_30_s_outage(edge, standin):
    """The upstream is SIGKILLed for 30 s while 50 devices publish 1,000 msg/s in total: afterwards
    every uplink the edge acknowledged arrives, in order per device; duplicates are counted."""
    ids = [f"fl{i:02d}" for i in range(50)]
    register(edge, standin, ids)
    edge.start()
    admin = edge.admin()
    for i in ids:
        edge.wait_state(admin, i, "connected", timeout=60)
    sensors, sent, acked = counting_sensors(edge.port, ids)
    seq = 0
    t0 = time.monotonic()
    killed = restarted = False
    while True:
        now = time.monotonic() - t0
        if now >= 50:
            break
        if now >= 10 and not killed:
            standin.kill()
            killed = True
        if now >= 40 and not restarted:
            standin.start()
            restarted = True
        for i in ids:                      # 50 uplinks every 50 ms: 1,000 msg/s
            info = sensors[i].c.publish(up(i), f"{seq}".encode(), qos=1)
            sent[i][info.mid] = seq
        seq += 1
        time.sleep(max(0.0, t0 + seq * 0.05 - time.monotonic()))
    dups = check_acknowledged_arrived(standin, sent, acked, up, timeout=120)
    total = sum(len(sent[i]) for i in ids)
    print(f"\n  outage test: {total} uplinks acknowledged, all delivered, {dups} duplicates")
    assert total >= 45000
    for s in sensors.values():
        s.close()


@pytest.fixture
def small_disk(tmp_path):
    """A 192 KiB tmpfs for the spool: a disk that fills up. Skipped where mounting is not allowed."""
    import subprocess
    d = tmp_path / "smalldisk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k,mode=0700", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def test_a_full_disk_refuses_uplinks_and_loses_nothing_spooled(edge, standin, small_disk):
    edge.options["spool_dir"] = str(small_disk / "spool")
    edge.options["spool_max_bytes"] = str(64 << 20)      # the disk, not the limit, runs out
    edge.spool = small_disk / "spool"
    register(edge, standin, ["sp-disk"])
    standin.stop()
    edge.start()
    admin = edge.admin()
    s = edge.sensor("sp-disk", clean=False, client_id="sp-disk-1")
    accepted = []
    for i in range(2000):
        info = s.c.publish(up("sp-disk"), f"{i:05d}".encode() + b"#" * 400, qos=1)
        info.wait_for_publish(3)
        if not info.is_published():
            break                        # 3.1.1: disconnected without a PUBACK: the client keeps it
        accepted.append(i)
    s.c.loop_stop()
    assert 100 < len(accepted) < 2000
    edge.broker.wait_log("No space left on device")
    edge.broker.wait_log("the spool cannot write")
    st = summary(edge, admin, lambda s: s["spool_io_errors"] > 0)
    assert st["spool_msgs"] == len(accepted)
    # upstream back: everything accepted arrives in order, and the disk has room again
    standin.start()
    wait_for(lambda: len(standin.uplinks(up("sp-disk"))) >= len(accepted), 60, what="the spooled uplinks")
    assert [int(p[:5]) for p in firsts(standin.uplinks(up("sp-disk")))][:len(accepted)] == accepted
    summary(edge, admin, lambda s: s["spool_msgs"] == 0 and s["spool_disk_bytes"] < 64 * 1024, timeout=30)
    again = edge.sensor("sp-disk")
    again.publish(up("sp-disk"), b"after the disk emptied", qos=1)
    wait_for(lambda: b"after the disk emptied" in standin.uplinks(up("sp-disk")), 20, what="a new uplink")
