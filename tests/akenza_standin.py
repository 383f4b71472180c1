# SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause
"""The akenza stand-in: a real Mosquitto with a TLS listener and the JWT-verifying plugin
(tests/standin/standin_auth.c), plus an observer client that sees what arrives upstream."""
import shutil
import threading
from pathlib import Path

import paho.mqtt.client as mqtt

from conftest import STANDIN, Broker, free_port, wait_for

OBSERVER_PASSWORD = "observer-secret"


class Observer:
    """A client of the stand-in that subscribes to everything and records it."""

    def __init__(self, port, cafile, topic="#"):
        self.messages = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.c = mqtt.Client(client_id=f"observer-{free_port()}", clean_session=True)
        self.c.username_pw_set("observer", OBSERVER_PASSWORD)
        self.c.tls_set(ca_certs=str(cafile))
        self.c.on_connect = lambda c, u, f, rc: (rc == 0 and self.connected.set())
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.on_message = self._on_message
        self.c.connect("localhost", port, 30)
        self.c.loop_start()
        assert self.connected.wait(10), "observer could not connect to the stand-in"
        self.c.subscribe(topic, 1)
        assert self.subscribed.wait(10), "observer could not subscribe"

    def _on_message(self, c, u, msg):
        with self.lock:
            self.messages.append((msg.topic, msg.payload))

    def received(self):
        with self.lock:
            return list(self.messages)

    def publish(self, topic, payload, qos=1):
        info = self.c.publish(topic, payload, qos)
        info.wait_for_publish(10)
        assert info.is_published()

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


class Standin:
    """Starts at construction; stop()/start() for outages (same port); stop() at the end."""

    def __init__(self, workdir, pki, cert=None, key=None, name="standin", extra="", audience=None):
        self.dir = Path(workdir)
        self.keys = self.dir / "keys"
        self.keys.mkdir(parents=True, exist_ok=True)
        self.pki = pki
        self.port = free_port()
        self.name = name
        self.observers = []
        conf = "\n".join([
            "per_listener_settings false",
            f"listener {self.port} 127.0.0.1",
            f"cafile {pki.ca_cert}",
            f"certfile {cert or pki.server_cert}",
            f"keyfile {key or pki.server_key}",
            "require_certificate false",
            f"plugin {STANDIN}",
            f"plugin_opt_keys_dir {self.keys}",
            f"plugin_opt_observer_password {OBSERVER_PASSWORD}",
            f"plugin_opt_record_file {self.dir / 'uplinks.rec'}",
            f"plugin_opt_audience {audience}" if audience else "",
            "max_queued_messages 0",
            "max_inflight_messages 0",
            extra,
        ])
        self.broker = Broker(self.dir, conf, self.port, name)

    def register(self, device_id, pubkey_pem):
        """Registers a device's public key, as a user uploads it to akenza."""
        shutil.copy(pubkey_pem, self.keys / f"{device_id}.pub.pem")

    def uplinks(self, topic=None):
        """Every uplink the stand-in accepted since it was first started (all restarts), in order:
        [(topic, payload)], or [payload] for one topic. Recorded by its plugin before the PUBACK,
        so no message slips by between a restart and a subscriber's SUBACK."""
        f = self.dir / "uplinks.rec"
        out = []
        if f.exists():
            text = f.read_text()
            for line in text.splitlines()[:None if text.endswith("\n") else -1]:   # whole lines only
                t, _, h = line.partition(" ")
                try:
                    out.append((t, bytes.fromhex(h)))
                except ValueError:
                    pass   # a line being written
        return [p for t, p in out if t == topic] if topic else out

    def observer(self, topic="#"):
        o = Observer(self.port, self.pki.ca_cert, topic)
        self.observers.append(o)
        return o

    def publish_downlink(self, device_id, payload, sub=""):
        o = self.observers[0] if self.observers else self.observer()
        o.publish(f"/down/device/id/{device_id}{sub}", payload)

    def log(self):
        return self.broker.log()

    def wait_log(self, needle, timeout=10):
        return wait_for(lambda: needle in self.log(), timeout, what=f"'{needle}' in the stand-in log")

    def start(self):
        self.broker.start()

    def stop(self):
        for o in self.observers:
            try:
                o.close()
            except Exception:
                pass
        self.observers = []
        self.broker.stop()

    def kill(self):
        self.broker.kill()
