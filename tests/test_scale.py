# SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause
"""Scale: 1,000 devices (AKZ_SCALE_DEVICES) bridged at once through a full token refresh cycle, the
CI-sized version of the 10,000-device run (AKZ_SCALE_DEVICES=10000). Prints ramp, refresh spread,
CPU, memory and file descriptors per device."""
import json
import os
import re
import resource
import time

from conftest import cpu_seconds, rss_kb, wait_for
from edge import Edge, Sensor, password_hash

N = int(os.environ.get("AKZ_SCALE_DEVICES", "1000"))


def test_a_thousand_devices_through_a_token_refresh_cycle(brokers, tmp_path, standin, pki):
    from Cryptodome.PublicKey import ECC
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))   # the brokers inherit it
    assert hard > N + 300, f"file limit {hard} too low for {N} devices"

    e = Edge(brokers, tmp_path / "edge", standin.port, pki.ca_cert)
    e.options.update({"token_lifetime": "60", "connect_rate": "5000", "status_interval": "1000",
                      "spool_dir": str(tmp_path / "edge" / "spool")})
    ids = [f"sc{i:04d}" for i in range(N)]
    pw = password_hash("pw-x")
    for i in ids:
        k = ECC.generate(curve="P-256")
        priv = e.keys / f"{i}.pem"
        priv.write_text(k.export_key(format="PEM"))
        os.chmod(priv, 0o600)
        (standin.keys / f"{i}.pub.pem").write_text(k.public_key().export_key(format="PEM"))
        e.devices.append({"id": i, "password": pw})
    e.gateways.append({"username": "gw", "password": password_hash("gw-pw"), "devices": ["*"]})
    e.write_registry()

    t0 = time.monotonic()
    e.start()
    pid = e.broker.proc.pid
    admin = e.admin()
    admin.subscribe("$SYS/broker/akenza/summary", 0)

    def connected():
        for t, p in reversed(admin.received()):
            if t.endswith("summary") and p:
                return json.loads(p)["connected"] == N
        return False
    wait_for(connected, 120, interval=0.1, what=f"{N} devices connected")
    ramp = time.monotonic() - t0
    resumed = next(json.loads(p) for t, p in reversed(admin.received()) if t.endswith("summary") and p)["tls_resumed"]
    cpu0, rss_online = cpu_seconds(pid), rss_kb(pid)
    # One descriptor per device: the plugin closes the socket pair libmosquitto opens per client
    # (which made it three). The rest: listeners, a few local clients, the spool, epoll.
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    assert fds < N + 100, f"{fds} descriptors open for {N} devices"

    # Now and then: every device publishes once every ~10 s, through one gateway connection,
    # until every device has connected a second time with a fresh token.
    obs = standin.observer()
    gw = Sensor(e.port, "gw", "gw-pw")
    gw.c.max_inflight_messages_set(1000)
    acked = []
    gw.c.on_publish = lambda c, u, mid: acked.append(mid)
    assert gw.connect() == 0
    sent = []   # (device, round); not keyed by mid: mids wrap at 65,535 with 10,000 devices

    def accepts():
        return re.findall(r"^(\d+): standin: accepted client '(sc\d{4})'", standin.log(), re.M)
    deadline = time.monotonic() + 120
    rnd = 0
    while time.monotonic() < deadline:
        for i in ids:
            info = gw.c.publish(f"/up/device/id/{i}", f"{rnd}".encode(), qos=1)
            assert info.rc == 0, info.rc
            sent.append((i, rnd))
        rnd += 1
        seen = {}
        for ts, dev in accepts():
            seen[dev] = seen.get(dev, 0) + 1
        if len(seen) == N and min(seen.values()) >= 2:
            break
        time.sleep(10)
    wait_for(lambda: len(acked) >= len(sent), 60, what="every PUBACK from the edge")
    cpu = cpu_seconds(pid) - cpu0
    seconds = {}
    for ts, dev in accepts():
        seconds.setdefault(dev, []).append(int(ts))
    assert all(len(v) >= 2 for v in seconds.values()) and len(seconds) == N, "not every device refreshed"
    refresh_at = sorted(v[1] for v in seconds.values())
    spread = refresh_at[-1] - refresh_at[0]

    want = set(sent)

    def arrived():
        got = set()
        for t, p in obs.received():
            got.add((t.rsplit("/", 1)[1], int(p)))
        return got
    wait_for(lambda: want <= arrived(), 60, what="every uplink upstream")
    assert "expired: disconnecting" not in standin.log()
    per_device_kb = rss_online / N
    print(f"\n  scale: {N} devices online in {ramp:.1f} s ({N / ramp:.0f}/s, {resumed} on resumed TLS "
          f"sessions); token refresh of all "
          f"spread over {spread} s; {len(want)} uplinks relayed, none lost; edge CPU {cpu:.1f} s over "
          f"{rnd} rounds; edge RSS {rss_online / 1024:.1f} MiB ({per_device_kb:.1f} KB per device, "
          f"broker included); {fds} descriptors open")
    # A fleet must not refresh in the same second: 70-90 % of 60 s leaves a 12 s window.
    assert spread >= 6, f"refreshes bunched within {spread} s"
    gw.close()
