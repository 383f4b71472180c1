"""Claims of SECURITY.md that no other test proves: secrets never reach the broker log, devices
cannot reach $CONTROL topics, the upstream TLS version is pinned (no fallback)."""
import json
import re
import time

import paho.mqtt.client as mqtt

from conftest import wait_for
from edge import Edge, Sensor

SECRET = "Sensor-Secret-7431"
WRONG = "Wrong-Guess-9902"
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")


def up(device_id):
    return f"/up/device/id/{device_id}"


def bridged(brokers, tmp_path, standin, pki, ids, password="pw-x", **options):
    e = Edge(brokers, tmp_path / "edge", standin.port, pki.ca_cert)
    e.options.update(options)
    for i in ids:
        standin.register(i, e.add_device(i, password=password, write=False))
    e.write_registry()
    return e


def test_no_password_token_or_key_in_the_broker_log(brokers, tmp_path, standin, pki):
    """After logins (right and wrong), a token minted and used upstream, and traffic, the edge log (at
    log_type all, debug included) holds no plain password, no JWT and no line of a private key."""
    e = bridged(brokers, tmp_path, standin, pki, ["sec-a"], password=SECRET, token_lifetime="60")
    e.start()
    admin = e.admin()
    e.wait_state(admin, "sec-a", "connected", timeout=20)
    obs = standin.observer()
    bad = Sensor(e.port, "sec-a", WRONG)
    assert bad.connect() == 5
    bad.close()
    s = e.sensor("sec-a", password=SECRET)
    for n in range(20):
        s.publish(up("sec-a"), f"{n}".encode())
    wait_for(lambda: len([1 for t, _ in obs.received() if t == up("sec-a")]) >= 20, 20, what="uplinks")
    st = e.status(admin, "sec-a")
    assert st["kid"] and st["token_expires"] and not JWT.search(json.dumps(st)), st   # kid, never the token
    s.close()
    admin.close()
    e.broker.stop()
    log = e.broker.log()
    assert "refused user 'sec-a'" in log and "wrong password" in log   # the attempt is logged...
    assert SECRET not in log and WRONG not in log                      # ...the passwords are not
    assert not JWT.search(log), f"a JWT in the broker log: {JWT.search(log).group(0)[:40]}..."
    key_lines = [l for l in (e.keys / "sec-a.pem").read_text().splitlines() if l and "-----" not in l]
    assert key_lines and not any(l in log for l in key_lines), "private key material in the log"
    assert "PRIVATE KEY" not in log
    # the stand-in did receive a token: the check above is not vacuous
    assert "sec-a" in standin.log()


def test_devices_cannot_reach_control_topics(brokers, tmp_path, standin, pki):
    """The plugin's ACL confines devices to their own up/down trees: a $CONTROL publish or
    subscription by a device is denied (other local users' $CONTROL access is the broker's ACL)."""
    e = bridged(brokers, tmp_path, standin, pki, ["ctl-a"])
    e.start()
    s = e.sensor("ctl-a", protocol=mqtt.MQTTv5)
    info = s.c.publish("$CONTROL/dynamic-security/v1", b'{"commands":[]}', qos=1)
    info.wait_for_publish(10)
    done = []
    s.c.on_subscribe = lambda c, u, mid, rc, props=None: done.append(rc)
    s.c.subscribe("$CONTROL/#", 1)
    wait_for(lambda: done, 10, what="SUBACK")
    assert done[0][0].value >= 0x80, f"subscription to $CONTROL/# granted: {done[0]}"
    e.broker.wait_log("akenza: denied publish on '$CONTROL/dynamic-security/v1' to user 'ctl-a'")
    e.broker.wait_log("akenza: denied subscribe on '$CONTROL/#' to user 'ctl-a'")
    s.close()


def test_upstream_tls_version_is_pinned(brokers, tmp_path, standin_factory, pki):
    """The default pins TLS 1.2 exactly: a server that only speaks TLS 1.3 is refused before any
    token is sent, rather than negotiating whatever both sides have; tlsv1.3 then connects and
    relays both ways (through the bridge's socket filter, after TLS 1.3's post-handshake tickets)."""
    only13 = standin_factory(name="standin13", extra="tls_version tlsv1.3")
    e = bridged(brokers, tmp_path, only13, pki, ["tls-a"])
    e.start()
    admin = e.admin()
    st = e.wait_state(admin, "tls-a", "backoff", timeout=20)
    assert st["last_error"]
    time.sleep(1)
    assert "tls-a" not in only13.log(), "a token reached the server over a refused TLS version"
    admin.close()
    e.broker.stop()
    e.options["upstream_tls_version"] = "tlsv1.3"
    e.broker.conffile.write_text(e.conf() + f"\nlog_dest file {e.broker.logfile}\nlog_type all\nuser root\n")
    e.broker.start()
    admin = e.admin()
    e.wait_state(admin, "tls-a", "connected", timeout=20)
    s = e.sensor("tls-a")
    s.subscribe("/down/device/id/tls-a/#")
    s.publish("/up/device/id/tls-a", b"over 1.3", qos=1)
    wait_for(lambda: only13.uplinks("/up/device/id/tls-a") == [b"over 1.3"], 10, what="the uplink over TLS 1.3")
    only13.publish_downlink("tls-a", b"back over 1.3", "/cmd")
    wait_for(lambda: ("/down/device/id/tls-a/cmd", b"back over 1.3") in s.received(), 10,
             what="the downlink over TLS 1.3")
    s.close()
    admin.close()


def test_broker_refuses_a_key_others_can_read(brokers, tmp_path, pki):
    """The plugin (not only akenzactl) refuses a key file with group or other bits, unless
    plugin_opt_allow_readable_keys is set."""
    e = Edge(brokers, tmp_path / "edge", 1, pki.ca_cert)
    e.options["bridge"] = "false"
    e.add_device("perm-a")
    (e.keys / "perm-a.pem").chmod(0o644)
    b = e.start(expect_start=False)
    log = b.log()
    assert b.proc.returncode != 0 and "mode 0644: group or others can read it" in log, log[-2000:]
    assert "refusing to start" in log
    e.options["allow_readable_keys"] = "true"
    b.conffile.write_text(e.conf() + f"\nlog_dest file {b.logfile}\nlog_type all\nuser root\n")
    b.start()
    assert b.proc.poll() is None
