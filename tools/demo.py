#!/usr/bin/python3
# SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause
"""make run: the gateway's round trip on localhost, with real brokers, real TLS and a real key.

A throwaway CA, a local akenza stand-in (Mosquitto with TLS and the JWT-verifying plugin from
tests/standin), a demo device made with akenzactl, the edge broker with mosquitto_akenza.so, a plain
sensor that logs in with a username and password, a reading going up and a downlink coming back."""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import AKENZACTL, PKI, Broker, wait_for  # noqa: E402
from akenza_standin import Standin  # noqa: E402
from edge import Edge, Sensor  # noqa: E402

DEVICE = "demo-sensor-01"


def say(msg):
    print(f"\n== {msg}", flush=True)


def main():
    work = Path(tempfile.mkdtemp(prefix="akenza-demo-"))
    started = []

    def brokers(conf, port=None, name="broker", **kw):
        b = Broker(work / name, conf, port, name, **kw)
        started.append(b)
        return b
    try:
        say(f"working in {work}")
        say("making a throwaway CA and a server certificate for localhost")
        pki = PKI(work / "pki")

        say("starting the akenza stand-in (TLS, JWT-verifying) on localhost")
        standin = Standin(work / "standin", pki)
        started.append(standin)
        print(f"   stand-in listens on 127.0.0.1:{standin.port} (TLS)")

        say(f"creating device '{DEVICE}' with akenzactl")
        edge = Edge(brokers, work / "edge", standin.port, pki.ca_cert)
        out = subprocess.run([str(AKENZACTL), "keygen", "--device", DEVICE, "--type", "ec", "--out",
                              str(edge.keys)], check=True, capture_output=True, text=True).stdout
        print("   akenzactl keygen ->", out.strip())
        pw = subprocess.run([str(AKENZACTL), "passwd"], input="sensor-secret\n", check=True,
                            capture_output=True, text=True).stdout.strip()
        edge.devices.append({"id": DEVICE, "password": pw, "enabled": True})
        edge.write_registry()
        print("   registry:", json.dumps({"devices": [{"id": DEVICE, "password": pw[:12] + "..."}]}))
        standin.register(DEVICE, edge.keys / f"{DEVICE}.pub.pem")
        print(f"   public key registered upstream: {DEVICE}.pub.pem (as you would upload it to akenza)")

        say("starting the edge broker with mosquitto_akenza.so")
        edge.start()
        print(f"   edge listens on 127.0.0.1:{edge.port} (plain MQTT for sensors)")
        admin = edge.admin()
        st = edge.wait_state(admin, DEVICE, "connected", timeout=30)
        print(f"   $SYS/broker/akenza/devices/{DEVICE}: {json.dumps(st)}")

        observer = standin.observer()
        say("the sensor publishes a reading (username + password, no crypto)")
        sensor = Sensor(edge.port, DEVICE, "sensor-secret")
        assert sensor.connect() == 0
        sensor.subscribe(f"/down/device/id/{DEVICE}/#")
        sensor.publish(f"/up/device/id/{DEVICE}", b'{"temperature":22}', qos=1)
        topic, payload = wait_for(lambda: next(((t, p) for t, p in observer.received()
                                                if t.startswith("/up/")), None), 15,
                                  what="the reading upstream")
        print(f"   upstream got {topic}: {payload.decode()}")

        say("akenza sends a downlink")
        standin.publish_downlink(DEVICE, b'{"interval":60}', "/config")
        topic, payload = wait_for(lambda: next(iter(sensor.received()), None), 15,
                                  what="the downlink at the sensor")
        print(f"   the sensor got {topic}: {payload.decode()}")
        sensor.close()
        say("round trip complete. See README.md for pointing the same setup at mqtt.akenza.io.")
        return 0
    except Exception as e:  # the demo explains, it does not dump a traceback on a user
        print(f"\ndemo failed: {e}", file=sys.stderr)
        for b in started:
            if hasattr(b, "log"):
                print(f"--- last log lines of {getattr(b, 'name', b)}:\n{b.log()[-2000:]}", file=sys.stderr)
        return 1
    finally:
        for b in reversed(started):
            b.stop()


if __name__ == "__main__":
    sys.exit(main())
