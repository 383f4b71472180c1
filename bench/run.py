#!/usr/bin/python3
# SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause
"""make bench: each figure beside a peer measured in the same run, printed as a ratio.

Sections (run all, or name some: bench/run.py jwt connect bridge remote memory):
  jwt      tokens/s of our minting vs `openssl speed` signing, libjwt 1.x and akenza's reference client
  connect  local authenticated CONNECTs/s (cold, cached) vs Mosquitto's own password_file
  bridge   relayed uplinks/s, loss, CPU per message and latency vs Mosquitto's built-in bridge and
           vs publishing straight upstream (medians of BENCH_ROUNDS=3 alternating rounds; latency:
           the samples of BENCH_LAT_ROUNDS=15 short rounds pooled); QoS 1 from 1, 10 and 100
           devices; downlink latency (BENCH_DOWN_ROUNDS=5 rounds of 1,000 pooled)
  remote   the same latency with the upstream's acknowledgements BENCH_ACK_DELAY_MS=20 late (as from
           akenza across a WAN), also vs the built-in bridge with TCP_NODELAY
  spool    relayed QoS 1 uplinks/s per spool_sync mode vs the in-memory queue; drain of a 1,000,000-
           message backlog (BENCH_BACKLOG) after an outage
  memory   memory per upstream device and time to bring N devices online (N = 1000, and
           BENCH_DEVICES=10000 for the large run)
  light    light load: edge CPU per uplink at 1,000 uplinks/s in total through 100 devices (QoS 1)
           vs the built-in bridge at the same load (BENCH_LIGHT_ROUNDS=5 alternating rounds of
           BENCH_LIGHT_SECONDS=5 s; also each round against the built-in's before it), the same
           without the light-load pause and with akenza's PUBACKs BENCH_ACK_DELAY_MS=20 late (a
           gateway's WAN), and the edge's CPU with 1,000 connected idle devices
  instructions  the edge's instructions per uplink under callgrind (10 devices, 1,000 QoS 1 uplinks
           at 200/s, minus a run as long with 100: the same logins) vs the built-in bridge: repeatable on a
           busy machine, where CPU time is not (it leaves out the kernel: syscalls, wake-ups)
  auth     the longest stall of the broker thread (an admin client's round trip through it) while
           10 threads send wrong passwords for 50 usernames for BENCH_FLOOD_SECONDS=10 s, from one
           address and from 10; the login time of a registry user, a disabled device and an unknown
           username with a wrong password, and of a cached good login
  onboard  BENCH_FLEET=1000 devices imported from CSV (akenzactl akenza import) and registered with
           the REST stand-in over TLS (akenzactl akenza register): devices/s and requests per
           device, vs the same requests from one kept-alive Python http.client (200 devices);
           and BENCH_FLEET_WAN=100 devices with BENCH_API_DELAY_MS=50 added per request
  tpm      tokens/s with keys in a TPM (ES256, RS256) vs the same in files; time to bring
           BENCH_TPM_DEVICES=1000 TPM-keyed devices online vs file keys, and the uplink latency of
           a connected device meanwhile. A software TPM (swtpm) unless AKZ_TPM_TCTI names a real
           one (device:/dev/tpmrm0)
"""
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
# Every broker here logs as a deployed one does (Mosquitto's default types), not at debug level
# as the tests' brokers do: a debug line per packet would be a large part of what is measured,
# and more of it for the built-in bridge (four lines per relayed QoS 1 message) than for ours.
os.environ.setdefault("AKZ_LOG_TYPES", "error warning notice information")
BUILD = Path(os.environ.get("AKZ_BUILD", ROOT / "build"))
LOADGEN = BUILD / "bench" / "loadgen"
BENCH_JWT = BUILD / "bench" / "bench_jwt"

from conftest import PKI, Broker, cpu_seconds, free_port, rss_kb, run, wait_for  # noqa: E402
from edge import Sensor, make_key, password_hash  # noqa: E402

WORK = Path(tempfile.mkdtemp(prefix="akenza-bench-"))
STARTED = []


def broker(conf, name, port=None, env=None):
    """A Mosquitto on conf (PORT: a free port), with env added to its environment."""
    port = port or free_port()
    b = Broker(WORK / name, conf.replace("PORT", str(port)), port, name, env=env, timeout=60)
    b.port = port
    STARTED.append(b)
    return b


STOPPERS = []   # stop() of other processes started (the REST stand-in)


def stop_all():
    while STARTED:
        STARTED.pop().stop()
    while STOPPERS:
        STOPPERS.pop()()


def row(name, value, unit, peer=None, peer_value=None, digits=1):
    ratio = f"  ratio {value / peer_value:.2f}x vs {peer}" if peer and peer_value else ""
    print(f"  {name:<46} {value:>12,.{digits}f} {unit}{ratio}", flush=True)


# ---- jwt ---------------------------------------------------------------------------------------

def openssl_speed(alg):
    out = run(["openssl", "speed", "-seconds", "3", alg], timeout=120).stdout
    line = [l for l in out.splitlines() if re.search(r"(ecdsa \(nistp256\)|^rsa\s+2048 bits)", l)][-1]
    return float(line.split()[-2])


def reference_rate(kind, priv, pub, seconds=3):
    text = (ROOT.parent / "shared/reference/000_d5ae0ccb724481ec.txt").read_text()
    import html
    if kind == "rsa":
        block = re.search(r'<code class="lang-python">(.*?)</code></pre>', text, re.S).group(1)
        src = html.unescape(re.sub(r"<[^>]+>", "", block))
    else:
        src = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    src = src.split("tls_config = {")[0]
    prog = ("import sys, time, Cryptodome, Cryptodome.PublicKey\n"
            "sys.modules['Crypto'] = Cryptodome; sys.modules['Crypto.PublicKey'] = Cryptodome.PublicKey\n"
            + src + f"\nn = 0\nt0 = time.monotonic()\nwhile time.monotonic() - t0 < {seconds}:\n"
            f"    create_jwt('bench-device-0001', '{priv}', '{pub}')\n    n += 1\n"
            "print(n / (time.monotonic() - t0))\n")
    return float(subprocess.run(["/usr/bin/python3", "-c", prog], capture_output=True, text=True,
                                check=True, timeout=120).stdout)


def bench_jwt():
    print("\n== JWT minting, one core (ours: akz_jwt_mint; keys parsed once)")
    for kind, alg, speed in (("ec", "es256", "ecdsap256"), ("rsa", "rs256", "rsa2048")):
        priv, pub = make_key(WORK / "jwt", kind, kind)
        out = run([str(BENCH_JWT), str(priv), alg, "3"], timeout=60).stdout.split()
        ours, libjwt, loads, store, pem = float(out[1]), float(out[3]), float(out[5]), float(out[7]), float(out[9])
        raw = openssl_speed(speed)
        ref = reference_rate(kind, priv, pub)
        print(f" {alg.upper()}:")
        row("ours (tokens/s)", ours, "/s", "openssl speed raw signing", raw)
        row(f"openssl speed {speed} (signatures/s)", raw, "/s")
        row("libjwt 1.x (tokens/s)", libjwt, "/s", "ours", ours)
        row("akenza reference client create_jwt (tokens/s)", ref, "/s", "ours", ours)
        row("key files loaded, akz_key_load (/s, with kid)", loads, "/s", "OSSL_STORE", store)
        row("key files loaded, OSSL_STORE_open (/s)", store, "/s")
        row("key files loaded, PEM_read_PrivateKey (/s)", pem, "/s", "ours", loads)


# ---- connect -----------------------------------------------------------------------------------

def bench_connect():
    print("\n== Local authenticated CONNECTs per second (sequential, one client at a time)")
    keys = WORK / "ckeys"
    keys.mkdir(exist_ok=True)
    n_users = 50
    cheap = password_hash("pw")              # mosquitto_passwd's own $7$ (101 iterations)
    strong = run([str(BUILD / "akenzactl"), "passwd"], input="pw\n").stdout.strip()  # 210,000
    devices = []
    for i in range(n_users):
        make_key(keys, f"c{i:03d}")
        devices.append({"id": f"c{i:03d}", "password": cheap})
        devices.append({"id": f"s{i:03d}", "password": strong, "key": str(keys / f"c{i:03d}.pem")})
    reg = WORK / "cdevices.json"
    reg.write_text(json.dumps({"devices": devices}))
    pwfile = WORK / "c.pw"
    for i in range(n_users):
        run(["mosquitto_passwd", "-b", *([] if i else ["-c"]), str(pwfile), f"p{i:03d}", "pw"])
    results = {}
    for label, cache in (("cold", "0"), ("cached", "300")):
        b = broker(f"listener PORT 127.0.0.1\nallow_anonymous false\npassword_file {pwfile}\n"
                   f"plugin {BUILD / 'mosquitto_akenza.so'}\nplugin_opt_devices {reg}\n"
                   f"plugin_opt_keystore {keys}\nplugin_opt_bridge false\nplugin_opt_auth_cache_seconds {cache}\n", f"conn-{label}")
        for user_fmt, what, n in (("c%03d", "registry, mosquitto_passwd hash (101 it.)", 2000),
                                  ("s%03d", "registry, akenzactl hash (210,000 it.)", 100 if cache == "0" else 2000),
                                  ("p%03d", "password_file, mosquitto_passwd hash", 2000)):
            if user_fmt.startswith("p") and label == "cached":
                continue
            if label == "cached":   # warm the cache: one login per user first
                run([str(LOADGEN), "conn", "-p", str(b.port), "-n", str(n_users), "-m", str(n_users),
                     "-u", user_fmt, "-P", "pw"], timeout=600)
            out = run([str(LOADGEN), "conn", "-p", str(b.port), "-n", str(n), "-m", str(n_users),
                       "-u", user_fmt, "-P", "pw"], timeout=600).stdout.split()
            rate = n / float(out[5])
            assert out[3] == "0", f"{what}: {out}"
            results[(label, what)] = rate
        b.stop()
    peer = results[("cold", "password_file, mosquitto_passwd hash")]
    for (label, what), rate in results.items():
        row(f"{what} [{label}]", rate, "conn/s", "password_file", peer)


# ---- bridge ------------------------------------------------------------------------------------

class Rig:
    """An upstream (TLS, anonymous), our edge (plugin, N devices) and a built-in-bridge edge."""

    def __init__(self, n, persist=False, upstream_env=None):
        """persist: the upstream keeps sessions across its restarts (a persistent sink's);
        upstream_env: added to the upstream's environment (a preloaded shim)."""
        self.n = n
        self.pki = PKI(WORK / "pki")
        keep = f"persistence true\npersistence_location {WORK}/\n" if persist else ""
        self.up = broker(f"listener PORT 127.0.0.1\ncafile {self.pki.ca_cert}\ncertfile {self.pki.server_cert}\n"
                         f"keyfile {self.pki.server_key}\nallow_anonymous true\nmax_queued_messages 0\n"
                         f"max_inflight_messages 0\n{keep}", "upstream", env=upstream_env)
        keys = WORK / "bkeys"
        keys.mkdir(exist_ok=True)
        self.keys = keys
        from Cryptodome.PublicKey import ECC
        devices = []
        pw = password_hash("pw")
        for i in range(n):
            p = keys / f"d{i:03d}.pem"
            if not p.exists():
                p.write_text(ECC.generate(curve="P-256").export_key(format="PEM"))
                os.chmod(p, 0o600)
            devices.append({"id": f"d{i:03d}", "password": pw})
        self.reg = WORK / f"devices-{n}.json"
        self.reg.write_text(json.dumps({"devices": devices}))
        self.adminpw = WORK / "admin.pw"
        run(["mosquitto_passwd", "-b", "-c", str(self.adminpw), "admin", "adminpw"])
        self.acl = WORK / "admin.acl"
        self.acl.write_text("user admin\ntopic readwrite #\ntopic read $SYS/#\n")

    def ours(self, extra="", reg=None, keys=None, env=None):
        """Our edge on this rig's registry and keys, or on reg and keys."""
        return broker(f"listener PORT 127.0.0.1\nallow_anonymous false\npassword_file {self.adminpw}\n"
                      f"acl_file {self.acl}\nplugin {BUILD / 'mosquitto_akenza.so'}\n"
                      f"plugin_opt_devices {reg or self.reg}\nplugin_opt_keystore {keys or self.keys}\n"
                      f"plugin_opt_upstream_host localhost\nplugin_opt_upstream_port {self.up.port}\n"
                      f"plugin_opt_upstream_cafile {self.pki.ca_cert}\nplugin_opt_connect_rate 5000\n"
                      f"plugin_opt_queue_max 100000\nplugin_opt_status_interval 100\nmax_queued_messages 0\n{extra}", "ours",
                      env=env)

    def builtin(self, name="builtin", extra="", env=None):
        """An edge with Mosquitto's built-in bridge; name is also its client id upstream."""
        return broker(f"listener PORT 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n{extra}"
                      f"connection up\naddress localhost:{self.up.port}\nbridge_cafile {self.pki.ca_cert}\n"
                      "bridge_tls_version tlsv1.2\nbridge_protocol_version mqttv311\ncleansession true\n"
                      f"remote_clientid {name}\ntopic /up/device/id/# out 1\ntopic /down/device/id/# in 1\n",
                      name, env=env)

    def wait_connected(self, edge, n, timeout=120):
        admin = Sensor(edge.port, "admin", "adminpw")
        assert admin.connect() == 0
        admin.subscribe("$SYS/broker/akenza/summary", 0)

        def connected():
            for t, p in reversed(admin.received()):
                return json.loads(p).get("connected") == n
            return False
        wait_for(connected, timeout, interval=0.02, what=f"{n} devices connected")
        admin.close()


def sink(port, count, wait_s=10, session=None, samples=None):
    """A subscriber to every uplink on the upstream, ready when this returns. session: a client id
    whose subscription (and the uplinks for it) outlives the sink (loadgen sub --session);
    samples: a file for every latency (loadgen sub --samples)."""
    p = subprocess.Popen([str(LOADGEN), "sub", "-p", str(port), "-t", "/up/device/id/#", "-c", str(count),
                          "-w", str(wait_s), "--cafile", str(RIG.pki.ca_cert), "--host", "localhost"] +
                         (["--session", session] if session else []) +
                         (["--samples", str(samples)] if samples else []), stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def sink_result(p):
    out, _ = p.communicate(timeout=600)
    f = out.split()
    return {"received": int(f[1]), "dups": int(f[3]), "secs": float(f[5]), "p50": float(f[7]), "p99": float(f[9])}


def relay(target, port, qos, clients, msgs, rate=0, user=True, cafile=None, samples=False):
    """Publishes through `port`; returns the sink's figures and the target's CPU seconds, and with
    samples every latency in us (r["samples"])."""
    total = clients * msgs
    samples_file = WORK / "samples.txt" if samples else None
    s = sink(RIG.up.port, total, samples=samples_file)
    cpu0 = cpu_seconds(target.proc.pid) if target else 0
    args = [str(LOADGEN), "pub", "-p", str(port), "-n", str(clients), "-m", str(msgs), "-q", str(qos),
            "--idfmt", "d%03d", "--inflight", "20"]
    if rate:
        args += ["-r", str(rate)]
    if user:
        args += ["-u", "d%03d", "-P", "pw"]
    if cafile:
        args += ["--cafile", str(cafile), "--host", "localhost"]
    pub = run(args, timeout=900).stdout.split()
    r = sink_result(s)
    r["cpu"] = (cpu_seconds(target.proc.pid) - cpu0) if target else 0
    r["sent"] = int(pub[1])
    r["lost"] = total - r["received"]
    if samples_file:
        r["samples"] = [int(x) / 1000 for x in samples_file.read_text().split()]
    return r


def pooled(runs, q):
    """The q-quantile (0..1) of the latencies of all runs together, in us."""
    v = sorted(x for r in runs for x in r["samples"])
    return v[min(int(len(v) * q), len(v) - 1)] if v else 0


RIG = None


def msg_rate(r):
    """Relayed messages per second of one relay() run."""
    return r["received"] / r["secs"] if r["secs"] else 0


def cpu_us(r):
    """The target's CPU microseconds per relayed message of one relay() run."""
    return r["cpu"] / max(r["received"], 1) * 1e6


def bench_bridge():
    global RIG
    n, msgs = 100, int(os.environ.get("BENCH_MSGS", "1000"))
    rounds = int(os.environ.get("BENCH_ROUNDS", "3"))
    print(f"\n== Uplink relay: {n} devices x {msgs} messages, full speed; upstream is the same TLS broker")
    print(f"   (median of {rounds} rounds, the three senders taking turns; min-max in brackets)")
    RIG = Rig(n)
    ours = RIG.ours()
    RIG.wait_connected(ours, n)
    builtin = RIG.builtin()
    time.sleep(1)
    res = {}
    for qos in (0, 1):
        for _ in range(rounds):
            for name, tgt, port, user, ca in (("direct", None, RIG.up.port, False, RIG.pki.ca_cert),
                                              ("builtin", builtin, builtin.port, False, None),
                                              ("ours", ours, ours.port, True, None)):
                res.setdefault((name, qos), []).append(relay(tgt, port, qos, n, msgs, user=user, cafile=ca))

    def stat(runs, f):
        v = sorted(f(r) for r in runs)
        return v[len(v) // 2], v[0], v[-1]

    def spread(lo, hi, fmt):
        return f"[{fmt.format(lo)}-{fmt.format(hi)}]"
    for qos in (0, 1):
        rate, cpu, lost, dups = {}, {}, {}, {}
        for name in ("direct", "builtin", "ours"):
            runs = res[(name, qos)]
            rate[name] = stat(runs, msg_rate)
            cpu[name] = stat(runs, cpu_us)
            lost[name] = sum(r["lost"] for r in runs)
            dups[name] = sum(r["dups"] for r in runs)
        print(f" QoS {qos}:")
        row("straight to upstream (msg/s)", rate["direct"][0], "/s " + spread(*rate["direct"][1:], "{:,.0f}"))
        row("Mosquitto built-in bridge (msg/s)", rate["builtin"][0], "/s " + spread(*rate["builtin"][1:], "{:,.0f}"),
            "direct", rate["direct"][0])
        row("mosquitto_akenza (msg/s)", rate["ours"][0], "/s " + spread(*rate["ours"][1:], "{:,.0f}"),
            "built-in bridge", rate["builtin"][0])
        row("  lost, all rounds: built-in bridge", lost["builtin"], "msgs")
        row("  lost, all rounds: mosquitto_akenza", lost["ours"], "msgs")
        row("  duplicates, all rounds: mosquitto_akenza", dups["ours"], "msgs")
        row("  edge CPU per relayed message: built-in", cpu["builtin"][0], "us " + spread(*cpu["builtin"][1:], "{:.1f}"))
        row("  edge CPU per relayed message: ours", cpu["ours"][0], "us " + spread(*cpu["ours"][1:], "{:.1f}"),
            "built-in", cpu["builtin"][0])
    # Latency moves with where the scheduler put the six processes on this VM's two cores, and
    # that holds for a whole round: one round's p50 can be 40 us above the next one's, for either
    # bridge. So many short rounds, the three senders taking turns, and the quantiles of all their
    # samples together (the spread: the rounds' own).
    lat_rounds = int(os.environ.get("BENCH_LAT_ROUNDS", "15"))
    lat_msgs = 20
    print(f" Added latency at a fixed 1,000 msg/s (QoS 1), from sensor publish to upstream delivery:"
          f" {lat_rounds} rounds of {n * lat_msgs:,} uplinks, all samples pooled:")
    senders = (("direct", None, RIG.up.port, False, RIG.pki.ca_cert),
               ("builtin", builtin, builtin.port, False, None),
               ("ours", ours, ours.port, True, None))
    show_pooled(latency_rounds(senders, lat_rounds, n, lat_msgs), ("direct", "builtin", "ours"), "")
    # The same from one device: one connection, as the built-in bridge has, and a device busy
    # enough (every 1 ms) to be held if the edge counted as loaded.
    print(f" The same from one device ({lat_rounds} rounds of 2,000 uplinks, pooled):")
    show_pooled(latency_rounds(senders[1:], lat_rounds, 1, 2000), ("builtin", "ours"), ", 1 device")
    # akenza wants a connection per device; the built-in bridge carries every device on one. The
    # same 100,000 QoS 1 uplinks from fewer devices show what the connection count costs.
    print(f" QoS 1 by the number of sending devices, 100,000 uplinks each time (median of {rounds} rounds):")
    by_n = {100: (res[("builtin", 1)], res[("ours", 1)])}
    for k in (10, 1):
        runs = {"builtin": [], "ours": []}
        for _ in range(rounds):
            for name, tgt, user in (("builtin", builtin, False), ("ours", ours, True)):
                runs[name].append(relay(tgt, tgt.port, 1, k, 100 * msgs // k, user=user))
        by_n[k] = (runs["builtin"], runs["ours"])
    for k in (1, 10, 100):
        b, o = by_n[k]
        rb, ro = stat(b, msg_rate)[0], stat(o, msg_rate)[0]
        cb, co = stat(b, cpu_us)[0], stat(o, cpu_us)[0]
        row(f"  {k:3} devices: built-in bridge (msg/s)", rb, "/s")
        row(f"  {k:3} devices: mosquitto_akenza (msg/s)", ro, "/s", "built-in", rb)
        row(f"  {k:3} devices: edge CPU per message, built-in", cb, "us")
        row(f"  {k:3} devices: edge CPU per message, ours", co, "us", "built-in", cb)
        row(f"  {k:3} devices: lost, both bridges, all rounds", sum(r["lost"] for r in o) + sum(r["lost"] for r in b), "msgs")
    # One round's p99 is its tenth-slowest message, which moved by 2x between runs: rounds pooled.
    down_rounds = int(os.environ.get("BENCH_DOWN_ROUNDS", "5"))
    print(f" Downlink latency (upstream publish -> sensor at the edge), {down_rounds} rounds of 1,000 messages"
          " at 200 msg/s, pooled:")
    down = {}
    for _ in range(down_rounds):
        for name, edge, user in (("builtin", builtin, None), ("ours", ours, "d000")):
            down.setdefault(name, []).append(downlink_latency(edge, user))
    show_pooled(down, ("builtin", "ours"), ", downlink")
    row("  max builtin, downlink (us)", max(max(r["samples"]) for r in down["builtin"]), "us")
    row("  max ours, downlink (us)", max(max(r["samples"]) for r in down["ours"]), "us")


def latency_rounds(senders, rounds, clients, msgs):
    """rounds rounds in which each sender (name, target edge or None, port, log in as the device,
    CA file) in turn publishes msgs QoS 1 uplinks from each of clients devices at 1,000 msg/s.
    Returns each sender's relay() results with samples, by name."""
    lat = {}
    for _ in range(rounds):
        for name, tgt, port, user, ca in senders:
            lat.setdefault(name, []).append(relay(tgt, port, 1, clients, msgs, rate=1000, user=user, cafile=ca,
                                                  samples=True))
    return lat


def show_pooled(runs, names, what):
    """Rows of pooled p50, p90 and p99 for each name in runs, with the rounds' own spread; ours
    (and a tuned built-in bridge) against the built-in bridge, and ours against the tuned one."""
    for q, label in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99")):
        v = {name: pooled(runs[name], q) for name in names}
        for name in names:
            each = sorted(pooled([r], q) for r in runs[name])
            vs = name in ("ours", "tuned")
            row(f"  {label} {name}{what} (us)", v[name], f"us [{each[0]:.0f}-{each[-1]:.0f}]",
                "built-in" if vs else None, v["builtin"] if vs else None)
        if "tuned" in names:
            row(f"  {label} ours vs the tuned built-in bridge", v["ours"], "us", "tuned", v["tuned"])


def bench_remote():
    """Uplink latency with the upstream's acknowledgements a WAN round trip late."""
    global RIG
    n, lat_msgs = 100, 20
    delay = os.environ.get("BENCH_ACK_DELAY_MS", "20")
    lat_rounds = int(os.environ.get("BENCH_LAT_ROUNDS", "15"))
    print(f"\n== Added latency when akenza's acknowledgements come {delay} ms late, as across a WAN")
    print("   (the upstream preloads late_acks.so: PUBACKs and other writes of <= 40 bytes go out late, its")
    print("   deliveries to the subscriber at once). tuned: the built-in bridge with TCP_NODELAY (preloaded")
    print("   tcp_nodelay.so; set_tcp_nodelay covers only accepted clients) and max_inflight_messages 0. QoS 1,")
    print(f"   1,000 msg/s from {n} devices, {lat_rounds} rounds of {n * lat_msgs:,} uplinks, all samples pooled:")
    RIG = Rig(n, upstream_env={"LD_PRELOAD": str(BUILD / "bench" / "late_acks.so"), "AKZ_ACK_DELAY_MS": delay})
    ours = RIG.ours()
    RIG.wait_connected(ours, n)
    builtin = RIG.builtin()
    tuned = RIG.builtin("tuned", "max_inflight_messages 0\n", env={"LD_PRELOAD": str(BUILD / "bench" / "tcp_nodelay.so")})
    time.sleep(1)
    lat = latency_rounds((("direct", None, RIG.up.port, False, RIG.pki.ca_cert),
                          ("builtin", builtin, builtin.port, False, None),
                          ("tuned", tuned, tuned.port, False, None),
                          ("ours", ours, ours.port, True, None)), lat_rounds, n, lat_msgs)
    for name, runs in lat.items():
        lost = sum(r["lost"] for r in runs)
        assert lost == 0, f"{name}: {lost} uplinks lost"
    show_pooled(lat, ("direct", "builtin", "tuned", "ours"), "")


def downlink_latency(edge, user, msgs=1000, rate=200):
    """Every latency of upstream publish -> sensor, in us (r["samples"]); fails if one is missing."""
    samples_file = WORK / "down-samples.txt"
    p = subprocess.Popen([str(LOADGEN), "sub", "-p", str(edge.port), "-t", "/down/device/id/d000/#", "-c", str(msgs),
                          "-w", "5", "--samples", str(samples_file), *(["-u", user, "-P", "pw"] if user else [])],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    run([str(LOADGEN), "pub", "-p", str(RIG.up.port), "-n", "1", "-m", str(msgs), "-q", "1", "-r", str(rate),
         "--prefix", "/down/device/id/", "--idfmt", "d000/cmd", "--cafile", str(RIG.pki.ca_cert),
         "--host", "localhost"], timeout=120)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0 and int(out.split()[1]) == msgs, f"downlinks: {out.strip()}"
    return {"samples": [int(x) / 1000 for x in samples_file.read_text().split()]}


# ---- memory and ramp ---------------------------------------------------------------------------

def bench_memory():
    global RIG
    sizes = [1000] + ([int(os.environ["BENCH_DEVICES"])] if os.environ.get("BENCH_DEVICES") else [])
    print("\n== Memory per upstream device and time to bring devices online (TLS 1.2, local upstream)")
    for n in sizes:
        stop_all()
        RIG = Rig(n)
        base = RIG.ours("plugin_opt_bridge false\n")
        time.sleep(1)
        base_kb = rss_kb(base.proc.pid)
        base.stop()
        t0 = time.monotonic()
        ours = RIG.ours()
        RIG.wait_connected(ours, n, timeout=600)
        ramp = time.monotonic() - t0
        time.sleep(7)   # idle: the bridge gives back its connect-storm memory after 5 s
        kb = rss_kb(ours.proc.pid)
        row(f"{n} devices: edge RSS with bridge - without", (kb - base_kb) / 1024, "MiB")
        row(f"{n} devices: memory per idle upstream device", (kb - base_kb) * 1024 / n / 1000, "KB")
        row(f"{n} devices: time to bring all online", ramp, "s")
        row(f"{n} devices: devices online per second", n / ramp, "/s")
        ours.stop()


# ---- light load --------------------------------------------------------------------------------

def cpu_ns(pid):
    """Nanoseconds a process (all its threads) has run on a CPU, from the scheduler's
    /proc/PID/task/*/schedstat: finer than cpu_seconds' clock ticks."""
    total = 0
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((t / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass   # a thread that ended meanwhile
    return total


def sched_counts(pid):
    """(user s, system s, voluntary context switches) of a process summed over its threads: the
    switches count how often a thread went to sleep waiting for something, i.e. its wake-ups."""
    st = (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]).split()
    tick = os.sysconf("SC_CLK_TCK")
    switches = 0
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            m = re.search(r"^voluntary_ctxt_switches:\s+(\d+)", (t / "status").read_text(), re.M)
            switches += int(m.group(1))
        except (OSError, AttributeError):
            pass   # a thread that ended meanwhile
    return int(st[11]) / tick, int(st[12]) / tick, switches


# The rig publishes the plugin's status every 100 ms so that a section sees its devices connected
# soon; the sections that measure the cost of an uplink run the default (1 s), as a gateway does.
DEFAULT_STATUS = "plugin_opt_status_interval 1000\n"


def light_rounds(edges, rounds, n, msgs, rate):
    """rounds rounds in which each of edges (name, edge, log in as the device) in turn relays
    msgs QoS 1 uplinks from each of n devices at rate/s. Returns by name: CPU us per uplink of
    each round, pooled latency samples, and user s, system s, wake-ups and uplinks summed."""
    out = {name: {"cpu": [], "lat": [], "split": [0.0, 0.0, 0, 0], "lost": 0} for name, _, _ in edges}
    for _ in range(rounds):
        for name, tgt, user in edges:
            o = out[name]
            c0, s0 = cpu_ns(tgt.proc.pid), sched_counts(tgt.proc.pid)
            r = relay(None, tgt.port, 1, n, msgs, rate=rate, user=user, samples=True)
            c1, s1 = cpu_ns(tgt.proc.pid), sched_counts(tgt.proc.pid)
            o["cpu"].append((c1 - c0) / 1000 / max(r["received"], 1))
            o["lat"].append(r)
            for i in range(3):
                o["split"][i] += s1[i] - s0[i]
            o["split"][3] += r["received"]
            o["lost"] += r["lost"]
    return out


def show_light(out, names):
    """The light-load rows of light_rounds' results, each against the built-in bridge's."""
    med = {k: sorted(v["cpu"])[len(v["cpu"]) // 2] for k, v in out.items()}
    for name, label in names:
        v = sorted(out[name]["cpu"])
        vs = name != "builtin"
        row(f"edge CPU per uplink: {label}", med[name], f"us [{v[0]:.1f}-{v[-1]:.1f}]",
            "built-in" if vs else None, med["builtin"] if vs else None)
    # The VM's speed drifts between rounds and moves both bridges alike: each round of ours
    # against the built-in bridge's round just before it is the steadier comparison.
    for name, label in names:
        if name == "builtin":
            continue
        r = sorted(a / b for a, b in zip(out[name]["cpu"], out["builtin"]["cpu"]))
        row(f"  {label}: each round / the built-in's round before it", r[len(r) // 2],
            f"x (median) [{r[0]:.2f}-{r[-1]:.2f}]", digits=2)
    for name, label in names:
        u, k, w, count = out[name]["split"]
        count = max(count, 1)
        row(f"  {label}: user / system CPU per uplink (us)", u * 1e6 / count, f"/ {k * 1e6 / count:.1f} us")
        row(f"  {label}: thread wake-ups per uplink", w / count, "")
        row(f"  {label}: uplink latency p50 / p99 (us)", pooled(out[name]["lat"], 0.5),
            f"/ {pooled(out[name]['lat'], 0.99):.0f} us")
    row("lost, all bridges, all rounds", sum(o["lost"] for o in out.values()), "msgs")


def light_vs_builtin(extra, label, rounds, n, msgs, rate, builtin=None):
    """Our edge on RIG (with the options extra) against a built-in bridge (builtin, or a new one)
    in light_rounds, shown. Stops our edge; returns the built-in bridge's, still running."""
    ours = RIG.ours(DEFAULT_STATUS + extra)
    RIG.wait_connected(ours, n)
    builtin = builtin or RIG.builtin()
    time.sleep(1)
    out = light_rounds((("builtin", builtin, False), ("ours", ours, True)), rounds, n, msgs, rate)
    show_light(out, (("builtin", "Mosquitto built-in bridge"), ("ours", label)))
    ours.stop()
    STARTED.remove(ours)
    return builtin


def bench_light():
    """CPU at the load a gateway mostly sees: a steady trickle of uplinks, and no uplinks at all."""
    global RIG
    n, rate = 100, 1000
    rounds = int(os.environ.get("BENCH_LIGHT_ROUNDS", "5"))
    secs = int(os.environ.get("BENCH_LIGHT_SECONDS", "5"))
    msgs = rate * secs // n
    print(f"\n== Light load: {rate:,} QoS 1 uplinks/s in total through {n} devices, {rounds} rounds of {secs} s"
          " (the bridges taking turns; median, min-max in brackets)")
    RIG = Rig(n)
    builtin = light_vs_builtin("", "mosquitto_akenza", rounds, n, msgs, rate)
    # The same devices cannot be connected twice: the edge without the pause comes after the
    # first, against the same built-in bridge in rounds of its own.
    print(f" The same with plugin_opt_light_pause_ms 0 (no pause between the bridge thread's turns), {rounds} rounds:")
    light_vs_builtin("plugin_opt_light_pause_ms 0\n", "mosquitto_akenza, no pause", rounds, n, msgs, rate, builtin)
    stop_all()
    # On a gateway akenza is a WAN round trip away: its PUBACKs no longer come back within the
    # same wake-up as the uplink, for either bridge.
    delay = os.environ.get("BENCH_ACK_DELAY_MS", "20")
    print(f" The same with akenza's PUBACKs {delay} ms late, as across a WAN (the upstream preloads"
          f" late_acks.so), {rounds} rounds:")
    RIG = Rig(n, upstream_env={"LD_PRELOAD": str(BUILD / "bench" / "late_acks.so"), "AKZ_ACK_DELAY_MS": delay})
    light_vs_builtin("", "mosquitto_akenza", rounds, n, msgs, rate)
    stop_all()
    idle_n, idle_s = 1000, int(os.environ.get("BENCH_IDLE_SECONDS", "20"))
    print(f" Idle: the edge's CPU over {idle_s} s with {idle_n:,} connected devices and no traffic"
          " (a broker without the bridge beside it)")
    RIG = Rig(idle_n)
    base = RIG.ours("plugin_opt_bridge false\n")
    time.sleep(2)
    c0 = cpu_ns(base.proc.pid)
    time.sleep(idle_s)
    base_ms = (cpu_ns(base.proc.pid) - c0) / 1e6 / idle_s
    base.stop()
    STARTED.remove(base)
    ours = RIG.ours()
    RIG.wait_connected(ours, idle_n, timeout=600)
    time.sleep(7)   # the connect storm's after-effects (memory given back after 5 s) are over
    c0 = cpu_ns(ours.proc.pid)
    time.sleep(idle_s)
    ours_ms = (cpu_ns(ours.proc.pid) - c0) / 1e6 / idle_s
    row(f"{idle_n:,} idle devices: edge CPU (ms per s)", ours_ms, "ms/s", "no bridge", base_ms)
    row("  the same edge without the bridge (ms per s)", base_ms, "ms/s")
    row("  per idle device (us per s)", (ours_ms - base_ms) * 1000 / idle_n, "us/s")


def callgrind_ir(make_edge, user, n, uplinks, rate, seconds):
    """Instructions the edge that make_edge() starts under callgrind runs in `seconds` from when
    it is up, while n devices send `uplinks` QoS 1 uplinks at `rate`/s (none when 0)."""
    out = WORK / f"callgrind-{time.monotonic_ns()}.out"
    os.environ["AKZ_BROKER_WRAPPER"] = f"valgrind --tool=callgrind --callgrind-out-file={out}"
    try:
        edge = make_edge()
    finally:
        del os.environ["AKZ_BROKER_WRAPPER"]
    time.sleep(3)
    t0 = time.monotonic()
    if uplinks:
        r = relay(None, edge.port, 1, n, uplinks // n, rate=rate, user=user)
        assert r["lost"] == 0, r
    time.sleep(max(0.0, seconds - (time.monotonic() - t0)))
    edge.stop_timeout = 120   # callgrind writes its counts as the broker exits
    edge.stop()
    STARTED.remove(edge)
    return int(re.search(r"^(?:summary|totals): (\d+)", out.read_text(errors="replace"), re.M).group(1))


def bench_instructions():
    global RIG
    n, uplinks, rate = 10, 1000, 200
    print(f"\n== Instructions per uplink (callgrind; user space only): {uplinks:,} QoS 1 uplinks at {rate}/s"
          f" through {n} devices, minus a run as long with a tenth of them (the same logins)")
    RIG = Rig(n)

    def ours():
        e = RIG.ours(DEFAULT_STATUS)
        RIG.wait_connected(e, n, timeout=120)
        return e
    per = {}
    seconds = uplinks / rate + 2
    few = uplinks // 10
    for name, make, user in (("ours", ours, True), ("builtin", RIG.builtin, False)):
        # Both runs connect the same sensors (ours checks their passwords on the first login):
        # the difference is what the extra uplinks cost.
        many = callgrind_ir(make, user, n, uplinks, rate, seconds)
        base = callgrind_ir(make, user, n, few, rate, seconds)
        per[name] = (many - base) / (uplinks - few)
    row("Mosquitto built-in bridge (instructions/uplink)", per["builtin"], "")
    row("mosquitto_akenza (instructions/uplink)", per["ours"], "", "built-in", per["builtin"])


# ---- spool -------------------------------------------------------------------------------------

def spool_opts(name, mode, extra=""):
    d = WORK / name
    if d.exists():
        import shutil
        shutil.rmtree(d)
    return f"plugin_opt_spool_dir {d}\nplugin_opt_spool_sync {mode}\n{extra}"


def bench_spool():
    global RIG
    n, msgs = 100, int(os.environ.get("BENCH_MSGS", "1000"))
    print(f"\n== Spool: relayed QoS 1 uplinks/s by sync mode, {n} devices x {msgs} messages, vs the in-memory queue")
    RIG = Rig(n, persist=True)
    rates = {}
    for mode in ("memory", "none", "batch", "always"):
        e = RIG.ours("" if mode == "memory" else spool_opts(f"spool-{mode}", mode))
        RIG.wait_connected(e, n)
        r = relay(e, e.port, 1, n, msgs)
        assert r["lost"] == 0, r
        rates[mode] = r["received"] / r["secs"]
        e.stop()
        STARTED.remove(e)
    row("in-memory queue (msg/s)", rates["memory"], "/s")
    for mode in ("none", "batch", "always"):
        row(f"spool_sync {mode} (msg/s)", rates[mode], "/s", "in-memory", rates["memory"])

    backlog = int(os.environ.get("BENCH_BACKLOG", "1000000"))
    per = backlog // n
    print(f" Drain of a {per * n:,}-message backlog after an outage (spool_sync batch):")
    e = RIG.ours(spool_opts("spool-drain", "batch", f"plugin_opt_spool_max_bytes {1 << 31}\n"
                            f"plugin_opt_spool_device_max_bytes {1 << 28}\n"))
    RIG.wait_connected(e, n)
    # The sink's subscription must be there before the first device comes back and drains: a
    # session kept across the upstream's restart (its persistence), which gets what arrives
    # before the sink reconnects.
    run([str(LOADGEN), "sub", "-p", str(RIG.up.port), "-t", "/up/device/id/#", "-c", "0", "-w", "1",
         "--cafile", str(RIG.pki.ca_cert), "--host", "localhost", "--session", "drain-sink"])
    RIG.up.stop()
    t0 = time.monotonic()
    out = run([str(LOADGEN), "pub", "-p", str(e.port), "-n", str(n), "-m", str(per), "-q", "1",
               "--idfmt", "d%03d", "--inflight", "20", "-u", "d%03d", "-P", "pw"], timeout=1800).stdout.split()
    fill = time.monotonic() - t0
    assert int(out[3]) == per * n, f"the edge did not acknowledge every uplink: {out}"
    disk = sum(p.stat().st_size for p in (WORK / "spool-drain").glob("*.seg"))
    kb = rss_kb(e.proc.pid)
    row("  accepted into the spool while offline (msg/s)", per * n / fill, "/s")
    row("  spool files on disk", disk / 1048576, "MiB")
    row("  edge RSS holding the backlog", kb / 1024, "MiB")
    RIG.up.start()
    s = sink(RIG.up.port, per * n, wait_s=180, session="drain-sink")
    r = sink_result(s)
    row("  drained upstream (msg/s, first to last)", r["received"] / max(r["secs"], 1e-9), "/s",
        "live relay, batch", rates["batch"])
    row("  lost", per * n - r["received"], "msgs")
    row("  duplicates", r["dups"], "msgs")


# ---- auth --------------------------------------------------------------------------------------

def mqtt_connect_time(port, user, password, source="127.0.0.1", client_id=None):
    """One MQTT 3.1.1 CONNECT over a raw socket from source: (CONNACK return code, seconds from
    CONNECT sent to CONNACK read)."""
    import socket
    import struct

    def s16(b):
        return struct.pack("!H", len(b)) + b
    cid = (client_id or f"b{time.monotonic_ns()}").encode()
    body = s16(b"MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 30) + s16(cid) + s16(user.encode()) + s16(password.encode())
    with socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0)) as sk:
        sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        sk.sendall(bytes([0x10, len(body)]) + body)
        ack = b""
        while len(ack) < 4:
            chunk = sk.recv(4 - len(ack))
            if not chunk:
                break
            ack += chunk
        took = time.perf_counter() - t0
    return (ack[3] if len(ack) == 4 else -1), took


# The admin client's round trips through the broker, from a process of its own (no GIL shared
# with the flood): publishes QoS 0 to itself every 10 ms and prints every round trip in ms.
RTT_PROBE = r"""
import json, sys, threading, time
import paho.mqtt.client as mqtt
port, seconds = int(sys.argv[1]), float(sys.argv[2])
sent, rtts, lock = {}, [], threading.Lock()
def on_message(c, u, m):
    t = time.perf_counter()
    with lock:
        t0 = sent.pop(m.payload, None)
        if t0 is not None:
            rtts.append((t - t0) * 1000)
c = mqtt.Client(client_id="rtt-probe")
c.username_pw_set("admin", "adminpw")
c.on_message = on_message
c.connect("127.0.0.1", port, 60)
c.subscribe("bench/rtt", 0)
c.loop_start()
time.sleep(0.5)
print("ready", flush=True)
sys.stdin.readline()
end = time.perf_counter() + seconds
n = 0
while time.perf_counter() < end:
    n += 1
    key = str(n).encode()
    with lock:
        sent[key] = time.perf_counter()
    c.publish("bench/rtt", key, 0)
    time.sleep(0.01)
time.sleep(2)
now = time.perf_counter()
with lock:
    # a probe still unanswered counts as a round trip at least this long
    rtts += [(now - t0) * 1000 for t0 in sent.values()]
c.loop_stop()
print(json.dumps(sorted(rtts)))
"""


def flood_round(broker_, usernames, sources, seconds, threads=10):
    """threads clients send wrong passwords (all different) for usernames from sources for
    seconds, while the RTT probe runs. Returns (sorted round trips in ms, logins answered, broker
    CPU seconds)."""
    import threading
    probe = subprocess.Popen(["/usr/bin/python3", "-c", RTT_PROBE, str(broker_.port), str(seconds)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert probe.stdout.readline().strip() == "ready"
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def flood(n):
        k = 0
        while time.monotonic() < stop:
            k += 1
            try:
                mqtt_connect_time(broker_.port, usernames[(n * 13 + k) % len(usernames)], f"guess-{n}-{k}",
                                  source=sources[n % len(sources)])
                counts[n] += 1
            except OSError:
                time.sleep(0.01)
    c0 = cpu_seconds(broker_.proc.pid)
    probe.stdin.write("go\n")
    probe.stdin.flush()
    workers = [threading.Thread(target=flood, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(seconds + 120)
    cpu = cpu_seconds(broker_.proc.pid) - c0
    rtts = json.loads(probe.communicate(timeout=120)[0].strip().splitlines()[-1])
    return rtts, sum(counts), cpu


def bench_auth():
    print("\n== Password checks on the broker thread: a wrong-password flood, and what a login's time tells")
    n_users = 50
    strong = run([str(BUILD / "akenzactl"), "passwd"], input="right\n").stdout.strip()   # 210,000
    devices = [{"id": f"u{i:02d}", "password": strong} for i in range(n_users)]
    devices += [{"id": f"off{i}", "password": strong, "enabled": False} for i in range(9)]
    keys = WORK / "akeys"
    for d in devices:
        make_key(keys, d["id"])
    reg = WORK / "adevices.json"
    reg.write_text(json.dumps({"devices": devices}))
    pwfile = WORK / "a.pw"
    run(["mosquitto_passwd", "-b", "-c", str(pwfile), "admin", "adminpw"])
    acl = WORK / "a.acl"
    acl.write_text("user admin\ntopic readwrite bench/#\n")
    conf = (f"listener PORT 127.0.0.1\nallow_anonymous false\npassword_file {pwfile}\nacl_file {acl}\n"
            f"plugin {BUILD / 'mosquitto_akenza.so'}\nplugin_opt_devices {reg}\nplugin_opt_keystore {keys}\n"
            "plugin_opt_bridge false\n"
            + ("plugin_opt_auth_thread true\n" if os.environ.get("BENCH_AUTH_THREAD") else ""))
    seconds = float(os.environ.get("BENCH_FLOOD_SECONDS", "10"))
    users = [f"u{i:02d}" for i in range(n_users)]
    b = broker(conf, "auth-idle")
    rtts, _, _ = flood_round(b, users, ["127.0.0.1"], 3, threads=0)
    b.stop()
    print(" no flood (3 s):")
    row("admin round trip through the broker, longest", max(rtts), "ms")
    row("admin round trip, median", rtts[len(rtts) // 2], "ms")
    for label, sources in (("one address", ["127.0.0.1"]),
                           ("10 addresses", [f"127.0.0.{i}" for i in range(2, 12)])):
        b = broker(conf, f"auth-flood-{len(sources)}")
        rtts, answered, cpu = flood_round(b, users, sources, seconds)
        time.sleep(10)
        mqtt_connect_time(b.port, "u00", "last")   # the plugin's summary line comes with a login
        time.sleep(0.5)
        b.stop()
        # The plugin's own account of its password checks (absent before it kept one).
        spent = sum(int(m) for m in re.findall(r"failed password checks took (\d+) ms", b.log()))
        p99 = rtts[int(len(rtts) * 0.99) - 1] if rtts else float("nan")
        print(f" 10 threads, wrong passwords for {n_users} usernames for {seconds:.0f} s, from {label}:")
        row("admin round trip through the broker, longest", max(rtts), "ms")
        row("admin round trip, p99", p99, "ms")
        row("admin round trip, median", rtts[len(rtts) // 2], "ms")
        row("wrong-password logins answered", answered, "")
        row("broker CPU during the flood", 100 * cpu / seconds, "% of one core")
        if spent:
            row("failed password checks, by the plugin's summary", 100 * spent / 1000 / seconds,
                "% of the time")

    print(" login time, CONNECT to CONNACK, and the broker's CPU time for it (medians of 9 usernames of each kind):")
    b = broker(conf, "auth-timing")
    med = {}
    for what, user in (("registry user, wrong password", "u1"), ("disabled device, wrong password", "off"),
                       ("unknown username, wrong password", "nobody")):
        ts, cpus = [], []
        for k in range(9):
            # a username of its own each time (no lockout), 1.2 s apart (within the budget of
            # failed checks): this measures a check, not a refusal
            time.sleep(1.2)
            c0 = cpu_seconds(b.proc.pid)
            rc, took = mqtt_connect_time(b.port, f"{user}{k}", f"wrong-{k}", source=f"127.0.1.{k + 1}")
            time.sleep(0.05)   # the broker's last bookkeeping for the connection
            cpus.append((cpu_seconds(b.proc.pid) - c0) * 1000)
            assert rc == 5, (what, rc)
            ts.append(took * 1000)
        med[what] = (sorted(ts)[len(ts) // 2], sorted(cpus)[len(cpus) // 2])
    peer_t, peer_c = med["registry user, wrong password"]
    for what, (t, c) in med.items():
        reg = what.startswith("registry")
        row(what, t, "ms", None if reg else "registry user", peer_t)
        row(what + ", broker CPU", c, "ms", None if reg else "registry user", peer_c)
    time.sleep(1.2)
    rc, first = mqtt_connect_time(b.port, "u01", "right")
    assert rc == 0
    cached = sorted(mqtt_connect_time(b.port, "u01", "right")[1] * 1000 for _ in range(51))
    row("registry user, right password, checked", first * 1000, "ms")
    row("registry user, right password, cached (median of 51)", cached[25], "ms")
    b.stop()


# ---- onboard -----------------------------------------------------------------------------------

AKENZACTL = BUILD / "akenzactl"
WORKSPACE, DATA_FLOW = "2900000000000000", "0800000000000005"


def rest_standin(name, pki, **opts):
    from akenza_rest_standin import RestStandin
    keys = WORK / name / "mqtt-keys"
    keys.mkdir(parents=True)
    s = RestStandin(WORK / name / "rest", pki, keys, save_at_exit=True, **opts)
    STOPPERS.append(s.stop)
    return s


def akenzactl(*args, env=None, timeout=3600):
    t0 = time.monotonic()
    r = subprocess.run([str(AKENZACTL), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"akenzactl {' '.join(map(str, args[:3]))}: {r.stdout[-2000:]}{r.stderr[-2000:]}")
    return time.monotonic() - t0, r.stdout


def import_fleet(name, n, iterations):
    """A CSV of n devices imported into a fresh registry. Returns (seconds, registry path)."""
    d = WORK / name
    d.mkdir(parents=True)
    csv = d / "fleet.csv"
    csv.write_text("deviceId,username,password,key type\n" + "".join(f"fleet-{i:05d},,pw-{i},ec\n" for i in range(n)))
    t, _ = akenzactl("akenza", "import", csv, "--registry", d / "devices.json", "--iterations", iterations)
    return t, d / "devices.json"


def register(registry, rest, pki, *extra):
    """akenzactl akenza register --all: (seconds, its JSON summary)."""
    env = dict(os.environ, AKENZA_API_KEY=rest.api_key)
    t, out = akenzactl("akenza", "register", "--all", "--registry", registry, "--api-url", rest.url,
                       "--api-cafile", pki.ca_cert, "--json", *extra, env=env)
    return t, json.loads(out)["summary"]


def python_client(rest, pki, registry):
    """register's requests for 200 new devices - lookup (404), create, upload - from one kept-alive
    Python http.client, with nothing compared or checked. Returns devices/s."""
    import http.client
    import ssl
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    c = http.client.HTTPSConnection("localhost", rest.port, context=ctx)
    h = {"x-api-key": rest.api_key, "Content-Type": "application/json", "Accept": "application/json"}
    keys = Path(registry).parent / "keys"
    devs = [d["id"] for d in json.loads(Path(registry).read_text())["devices"][:200]]
    pems = {i: (keys / f"{i}.pub.pem").read_text() for i in devs}

    def call(method, path, body=None):
        c.request(method, path, body=json.dumps(body) if body else None, headers=h)
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"null")
    t0 = time.monotonic()
    for i in devs:
        st, _ = call("GET", f"/v3/devices/by-device-id?deviceId={i}")
        assert st == 404, st
        st, dev = call("POST", "/v3/devices", {"name": i, "deviceId": i, "workspaceId": WORKSPACE,
                                               "dataFlowId": DATA_FLOW, "connectivity": "MQTT"})
        assert st == 201, st
        st, _ = call("POST", f"/v3/device-authorization/devices/{dev['id']}/credentials",
                     {"name": i, "akenzaDeviceId": dev["id"], "algorithm": "EC256_PEM", "publicKey": pems[i]})
        assert st == 201, st
    return len(devs) / (time.monotonic() - t0)


def bench_onboard():
    n = int(os.environ.get("BENCH_FLEET", "1000"))
    n_wan = int(os.environ.get("BENCH_FLEET_WAN", "100"))
    delay = float(os.environ.get("BENCH_API_DELAY_MS", "50"))
    print(f"\n== Onboarding a fleet: {n:,} devices imported from CSV, then registered with the REST stand-in")
    print("   (akenzactl akenza import: EC key pair + $7$ password hash + registry entry each; akenzactl akenza")
    print("   register: lookup, create, upload, one request at a time over one kept-alive TLS connection)")
    pki = PKI(WORK / "onboard-pki")
    t_fast, reg = import_fleet("onboard-import-1k", n, 1000)
    t_full, _ = import_fleet("onboard-import", n, 210000)
    row(f"import {n:,} devices, hashes of 210,000 iterations", n / t_full, "devices/s")
    row(f"import {n:,} devices, hashes of 1,000 iterations", n / t_fast, "devices/s", "210,000", n / t_full)
    rest = rest_standin("onboard-python", pki)
    peer = python_client(rest, pki, reg)
    rest = rest_standin("onboard-rest", pki)
    t, s = register(reg, rest, pki, "--create", "--workspace", WORKSPACE, "--data-flow", DATA_FLOW)
    assert s["failed"] == 0 and s["uploaded"] == n and s["created"] == n, s
    row(f"register {n:,} new devices (create + upload)", n / t, "devices/s", "python http.client", peer)
    row("  requests per device", s["requests"] / n, "")
    row(f"  time for {n:,} devices", t, "s")
    t, s = register(reg, rest, pki)
    assert s["failed"] == 0 and s["uploaded"] == 0, s
    row(f"register {n:,} devices again (nothing to do)", n / t, "devices/s")
    row("  requests per device", s["requests"] / n, "")
    wan = rest_standin("onboard-wan", pki, delay_ms=delay)
    t_wan, reg_wan = import_fleet("onboard-import-wan", n_wan, 1000)
    t, s = register(reg_wan, wan, pki, "--create", "--workspace", WORKSPACE, "--data-flow", DATA_FLOW)
    assert s["failed"] == 0, s
    row(f"register {n_wan} new devices, {delay:.0f} ms per request", n_wan / t, "devices/s")
    row(f"  so {n:,} devices take", t * n / n_wan, "s")


# ---- tpm ---------------------------------------------------------------------------------------

class RealTpm:
    """The TPM named by AKZ_TPM_TCTI (e.g. device:/dev/tpmrm0), used as tests/swtpm.Swtpm is."""

    def __init__(self, tcti):
        self.tcti = tcti

    def env(self):
        return {"TPM2OPENSSL_TCTI": self.tcti, "TSS2_LOG": "all+none"}

    def keygen(self, keydir, device_id, kind="ec"):
        return run([str(BUILD / "akenzactl"), "keygen", "--device", device_id, "--type", kind, "--out",
                    str(keydir), "--store", "tpm2"], env=dict(os.environ, **self.env())).stdout.strip()

    def stop(self):
        pass


def ramp_with_latency(edge, n, msgs, rate):
    """Waits for n devices on edge to be online while device d000 (a file key, online first) relays
    msgs uplinks at rate/s. Returns the ramp's seconds and the relay's figures (latency samples)."""
    import threading
    t0 = time.monotonic()
    admin = Sensor(edge.port, "admin", "adminpw")
    assert admin.connect() == 0
    admin.subscribe("$SYS/broker/akenza/devices/d000", 0)
    wait_for(lambda: any(json.loads(p).get("state") == "connected" for t, p in admin.received() if p), 60,
             interval=0.01, what="d000 online")
    admin.close()
    res = {}
    th = threading.Thread(target=lambda: res.update(relay(edge, edge.port, 1, 1, msgs, rate=rate, samples=True)))
    th.start()
    RIG.wait_connected(edge, n, timeout=1800)
    ramp = time.monotonic() - t0
    th.join()
    return ramp, res


def bench_tpm():
    global RIG
    from swtpm import Swtpm
    n = int(os.environ.get("BENCH_TPM_DEVICES", "1000"))
    tcti = os.environ.get("AKZ_TPM_TCTI")
    tpm = RealTpm(tcti) if tcti else Swtpm(WORK / "swtpm")
    print(f"\n== Keys in a TPM through OpenSSL's tpm2 provider ({tcti or 'swtpm, a software TPM 2.0 on this machine'})")
    env = dict(os.environ, **tpm.env())
    try:
        print(" Tokens per second, one key, signed one after the other (akz_jwt_mint):")
        d = WORK / "tpm1"
        d.mkdir(exist_ok=True)
        for kind, alg in (("ec", "es256"), ("rsa", "rs256")):
            fpriv, _ = make_key(d, f"file-{kind}", kind)
            file_rate = float(run([str(BENCH_JWT), str(fpriv), alg, "3"], timeout=120).stdout.split()[1])
            tpm.keygen(d, f"tpm-{kind}", kind)
            tpm_rate = float(run([str(BENCH_JWT), str(d / f"tpm-{kind}.pem"), alg, "5", "default,tpm2"],
                                 env=env, timeout=120).stdout.split()[1])
            row(f"{alg.upper()}, key in the TPM (tokens/s)", tpm_rate, "/s", "key in a file", file_rate)
            row(f"{alg.upper()}, key in a file (tokens/s)", file_rate, "/s")

        print(f" {n} devices brought online (ES256), and meanwhile the uplink latency of a device online:")
        RIG = Rig(n)
        keys = WORK / "tpmkeys"
        keys.mkdir(exist_ok=True)
        t0 = time.monotonic()
        for i in range(n):
            if not (keys / f"t{i:04d}.pem").exists():
                tpm.keygen(keys, f"t{i:04d}")
        gen = time.monotonic() - t0
        import shutil
        shutil.copy(RIG.keys / "d000.pem", keys / "d000.pem")
        pw = password_hash("pw")
        reg = WORK / f"devices-tpm-{n}.json"
        reg.write_text(json.dumps({"devices": [{"id": "d000", "password": pw}] +
                                   [{"id": f"t{i:04d}", "password": pw} for i in range(n - 1)]}))
        msgs, rate = 1000, 100
        results = {}
        for label, edge_args in (("files", {}), ("tpm", {"reg": reg, "keys": keys, "env": tpm.env(),
                                                         "extra": "plugin_opt_providers default,tpm2\n"})):
            tpm_cpu0 = cpu_seconds(tpm.proc.pid) if getattr(tpm, "proc", None) else 0
            e = RIG.ours(**edge_args)
            ramp, during = ramp_with_latency(e, n, msgs, rate)
            edge_cpu = cpu_seconds(e.proc.pid)
            tpm_cpu = cpu_seconds(tpm.proc.pid) - tpm_cpu0 if getattr(tpm, "proc", None) else 0
            quiet = relay(e, e.port, 1, 1, msgs, rate=rate, samples=True)
            results[label] = (ramp, during, quiet, edge_cpu, tpm_cpu)
            e.stop()
            STARTED.remove(e)
        row("akenzactl keygen --store tpm2 (keys/s, a process each)", n / gen, "/s")
        for label, name in (("files", "keys in files"), ("tpm", "keys in the TPM")):
            ramp, during, quiet, edge_cpu, tpm_cpu = results[label]
            row(f"{n} devices, {name}: time to bring all online", ramp, "s",
                *(("keys in files", results["files"][0]) if label == "tpm" else ()))
            row("  edge CPU until then (s)", edge_cpu, "s")
            if label == "tpm" and tpm_cpu:
                row("  swtpm CPU until then (s; a real TPM is a chip of its own)", tpm_cpu, "s")
            row(f"  uplink latency p50 during the ramp ({rate}/s, QoS 1)", pooled([during], 0.5), "us",
                "after it", pooled([quiet], 0.5))
            row("  uplink latency p99 during the ramp", pooled([during], 0.99), "us", "after it", pooled([quiet], 0.99))
            row("  uplink latency max during the ramp", max(during["samples"]), "us", "after it", max(quiet["samples"]))
    finally:
        tpm.stop()


SECTIONS = {"jwt": bench_jwt, "connect": bench_connect, "bridge": bench_bridge, "remote": bench_remote,
            "memory": bench_memory, "spool": bench_spool, "light": bench_light, "instructions": bench_instructions,
            "onboard": bench_onboard, "tpm": bench_tpm, "auth": bench_auth}


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, 65536), max(hard, 65536)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    names = sys.argv[1:] or list(SECTIONS)
    print(f"mosquitto-akenza benchmarks ({os.cpu_count()} cores); work dir {WORK}")
    try:
        for name in names:
            SECTIONS[name]()
            stop_all()
    finally:
        stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
