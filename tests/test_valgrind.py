# SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause
"""The plugin inside a real broker under valgrind memcheck (opt-in: AKZ_VALGRIND=1, which
`make valgrind-integration` sets): start bridged to the stand-in with a spool, a few hundred
uplinks and downlinks, a SIGHUP reload that adds, removes and disables devices, a clean SIGTERM
stop. valgrind must report no error and no definitely lost byte. The plugin is the one of the
normal build (-O2 -g), so what is checked is what ships."""
import os
import re
import shutil

import pytest

from conftest import ROOT, wait_for
from edge import Edge

pytestmark = pytest.mark.skipif(os.environ.get("AKZ_VALGRIND") != "1" or shutil.which("valgrind") is None,
                                reason="opt-in: AKZ_VALGRIND=1 (make valgrind-integration), needs valgrind")

SUPP = ROOT / "tests" / "valgrind.supp"


def up(device_id, sub=""):
    return f"/up/device/id/{device_id}{sub}"


def down(device_id, sub=""):
    return f"/down/device/id/{device_id}{sub}"


def valgrind_wrapper(logfile):
    return ["valgrind", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite",
            "--track-fds=no", f"--suppressions={SUPP}", f"--log-file={logfile}", "--num-callers=40"]


def parse_valgrind(text):
    """(errors, definitely lost bytes) from a memcheck log; fails when the summary is missing."""
    errors = re.findall(r"ERROR SUMMARY: ([\d,]+) errors", text)
    assert errors, f"no ERROR SUMMARY in the valgrind log (did the broker exit?):\n{text[-3000:]}"
    lost = re.findall(r"definitely lost: ([\d,]+) bytes", text)
    return int(errors[-1].replace(",", "")), int(lost[-1].replace(",", "")) if lost else 0


def test_memcheck_start_traffic_reload_stop(brokers, tmp_path, standin, pki):
    e = Edge(brokers, tmp_path / "edge", standin.port, pki.ca_cert)
    e.options["spool_dir"] = str(tmp_path / "edge" / "spool")
    ids = ["vg-a", "vg-b", "vg-c"]
    for i in ids:
        standin.register(i, e.add_device(i, password="pw-x", write=False))
    e.write_registry()
    vlog = tmp_path / "valgrind.log"
    # valgrind runs the broker 20-50 times slower: generous start and stop bounds
    e.start(wrapper=valgrind_wrapper(vlog), timeout=90, stop_timeout=120)
    admin = e.admin()
    for i in ids:
        e.wait_state(admin, i, "connected", timeout=90)
    obs = standin.observer()
    sensors = {i: e.sensor(i) for i in ("vg-a", "vg-b")}
    for i, s in sensors.items():
        s.subscribe(down(i, "/#"))

    # traffic: 150 QoS 1 + 10 QoS 0 uplinks per device, 100 downlinks per device
    for n in range(150):
        for i, s in sensors.items():
            s.publish(up(i), f"{n}".encode(), qos=1)
    for n in range(10):
        for i, s in sensors.items():
            s.publish(up(i, "/q0"), f"{n}".encode(), qos=0)
    for n in range(100):
        for i in sensors:
            standin.publish_downlink(i, f"d{n}".encode(), "/cmd")
    for i, s in sensors.items():
        wait_for(lambda i=i: list(dict.fromkeys(p for t, p in obs.received() if t == up(i)))
                 == [f"{n}".encode() for n in range(150)], 90, what=f"{i}'s 150 uplinks upstream")
        wait_for(lambda s=s, i=i: len([1 for t, _ in s.received() if t == down(i, "/cmd")]) >= 100, 90,
                 what=f"{i}'s 100 downlinks")

    # reload: vg-d added, vg-c removed, vg-b disabled
    standin.register("vg-d", e.add_device("vg-d", password="pw-x", write=False))
    e.devices = [d for d in e.devices if d["id"] != "vg-c"]
    for d in e.devices:
        if d["id"] == "vg-b":
            d["enabled"] = False
    e.write_registry()
    e.broker.sighup()
    e.broker.wait_log("akenza: reloaded", timeout=60)
    e.wait_state(admin, "vg-d", "connected", timeout=90)
    e.broker.wait_log("device 'vg-c' left the bridge", timeout=60)
    e.broker.wait_log("device 'vg-b': disabled", timeout=60)
    d = e.sensor("vg-d")
    for n in range(20):
        d.publish(up("vg-d"), f"{n}".encode(), qos=1)
    wait_for(lambda: len(set(p for t, p in obs.received() if t == up("vg-d"))) == 20, 90,
             what="vg-d's uplinks after the reload")

    for s in list(sensors.values()) + [d, admin]:
        s.close()
    e.broker.stop()     # SIGTERM; valgrind writes its summary as the broker exits
    rc = e.broker.proc.returncode
    text = vlog.read_text(errors="replace")
    errors, lost = parse_valgrind(text)
    assert errors == 0 and lost == 0 and rc == 0, \
        f"valgrind: {errors} errors, {lost} bytes definitely lost, exit {rc}:\n{text[-12000:]}"
    assert "akenza" in e.broker.log()
