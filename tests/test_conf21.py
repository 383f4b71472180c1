# SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause
"""conf/mosquitto-2.1.conf as shipped, in a Mosquitto 2.1 broker (AKZ_MOSQUITTO): devices through
the plugin, every other local user through 2.1's password-file and acl-file plugins, no
deprecated option, and the bridge to the akenza stand-in."""
import json
import shutil
import threading

import paho.mqtt.client as mqtt
import pytest

from conftest import AKENZACTL, PLUGIN, ROOT, free_port, mosquitto_plugin, mosquitto_version, run, wait_for
from edge import Sensor

pytestmark = pytest.mark.skipif(mosquitto_version() < (2, 1, 0),
                                reason="the password-file and acl-file plugins are Mosquitto 2.1's")


def granted(port, user, password, topic):
    """The SUBACK's return code for topic, subscribing as user (0x80: refused)."""
    c = mqtt.Client(client_id=f"granted-{user}")
    c.username_pw_set(user, password)
    got, connected = [], threading.Event()
    done = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.on_subscribe = lambda cl, u, mid, qos: (got.extend(qos), done.set())
    c.connect("127.0.0.1", port, 30)
    c.loop_start()
    try:
        assert connected.wait(10)
        c.subscribe(topic, 0)
        assert done.wait(10), f"no SUBACK for {topic}"
        return got[0]
    finally:
        c.disconnect()
        c.loop_stop()


def refused(port, user, password):
    s = Sensor(port, user, password)
    try:
        return s.connect() != 0
    finally:
        s.close()


def test_example_conf_for_2_1(tmp_path, brokers, standin, pki):
    cfg = tmp_path / "config"
    shutil.copytree(ROOT / "conf", cfg)
    run(["mosquitto_passwd", "-b", str(cfg / "passwd"), "admin", "adminpw"])   # 2.1's tool
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    run([str(AKENZACTL), "keygen", "--device", "demo-sensor-01", "--type", "ec", "--out", str(keys)])
    standin.register("demo-sensor-01", keys / "demo-sensor-01.pub.pem")
    port = free_port()
    conf = (cfg / "mosquitto-2.1.conf").read_text()
    for old, new in (("/mosquitto/config/", f"{cfg}/"), ("/mosquitto/keys", str(keys)),
                     ("/mosquitto/data/", f"{tmp_path}/"),
                     ("/usr/local/lib/mosquitto/mosquitto_akenza.so", str(PLUGIN)),
                     ("/usr/local/lib/mosquitto_password_file.so", mosquitto_plugin("mosquitto_password_file.so")),
                     ("/usr/local/lib/mosquitto_acl_file.so", mosquitto_plugin("mosquitto_acl_file.so")),
                     ("listener 1883", f"listener {port} 127.0.0.1"), ("log_dest stderr\n", "")):
        assert old in conf, old
        conf = conf.replace(old, new)
    upstream = (f"plugin_opt_upstream_host localhost\nplugin_opt_upstream_port {standin.port}\n"
                f"plugin_opt_upstream_cafile {pki.ca_cert}\n")
    anchor = "# Every other plugin_opt_ of mosquitto.conf applies here unchanged"
    assert anchor in conf
    conf = conf.replace(anchor, upstream + anchor)
    b = brokers(conf, port, name="example21")
    b.wait_log("akenza: 1 devices, 0 gateways")
    assert "deprecated" not in b.log()

    # a device: the plugin decides, before the password-file plugin would refuse an unknown user
    s = Sensor(port, "demo-sensor-01", "secret")
    assert s.connect() == 0
    obs = standin.observer()
    wait_for(lambda: "standin: accepted client 'demo-sensor-01'" in standin.log(), 15, what="the device upstream")
    s.publish("/up/device/id/demo-sensor-01", b'{"temperature":22}')
    wait_for(lambda: ("/up/device/id/demo-sensor-01", b'{"temperature":22}') in obs.received(), 10,
             what="the uplink at akenza")
    s.close()
    assert refused(port, "demo-sensor-01", "wrong")
    assert granted(port, "demo-sensor-01", "secret", "$SYS/#") == 0x80

    # local users: the password-file plugin; what they may do: the acl-file plugin
    assert refused(port, "admin", "wrong") and refused(port, "nobody", "secret")
    r = run([str(AKENZACTL), "status", "-u", "admin", "-P", "adminpw", "-p", str(port), "-W", "5"], check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["devices"] == 1
    # (the acl-file plugin grants every subscription and filters what is delivered)
    health, admin = Sensor(port, "health", "health"), Sensor(port, "admin", "adminpw")
    assert health.connect() == 0 and admin.connect() == 0
    for c in (health, admin):
        c.subscribe("$SYS/broker/uptime", 0)
        c.subscribe("$SYS/broker/akenza/#", 0)
    wait_for(lambda: {t for t, _ in admin.received()} >= {"$SYS/broker/uptime", "$SYS/broker/akenza/summary"}, 15,
             what="uptime and the summary at the admin")
    wait_for(lambda: any(t == "$SYS/broker/uptime" for t, _ in health.received()), 15, what="uptime at the healthcheck")
    assert not [t for t, _ in health.received() if t.startswith("$SYS/broker/akenza/")]
    health.close()
    admin.close()
