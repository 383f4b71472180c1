# SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause
"""The akenza stand-in is faithful: akenza's reference client is accepted, every bad token refused."""
import base64
import html
import json
import re
import subprocess
import time

import jwt
import paho.mqtt.client as mqtt
import pytest

from conftest import SHARED, wait_for
from edge import make_key

REFERENCE = SHARED / "reference" / "000_d5ae0ccb724481ec.txt"


def reference_script(kind, device_id, priv, pub, port, cafile):
    """The reference client's code as published, with only host, port, TLS CA, device id and key
    paths changed, and Debian's Cryptodome standing in for Crypto."""
    text = REFERENCE.read_text()
    if kind == "rsa":
        block = re.search(r'<pre class="language-python".*?<code class="lang-python">(.*?)</code></pre>', text, re.S).group(1)
        src = html.unescape(re.sub(r"<[^>]+>", "", block))
    else:
        src = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    src = src.replace('device_id = "<deviceId>"', f'device_id = "{device_id}"')
    src = src.replace('host = "mqtt.akenza.io"', 'host = "localhost"')
    src = src.replace("port = 8883", f"port = {port}")
    src = re.sub(r'public_key_file_path = ".*?"', f'public_key_file_path = "{pub}"', src)
    src = re.sub(r'private_key_file_path = ".*?"', f'private_key_file_path = "{priv}"', src)
    src = src.replace('"cert_reqs": ssl.CERT_REQUIRED,', f'"cert_reqs": ssl.CERT_REQUIRED, "ca_certs": "{cafile}",')
    assert f'"ca_certs": "{cafile}"' in src and f"port = {port}" in src
    prelude = ("import sys, Cryptodome, Cryptodome.PublicKey\n"
               "sys.modules['Crypto'] = Cryptodome\nsys.modules['Crypto.PublicKey'] = Cryptodome.PublicKey\n")
    return prelude + src


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_reference_client_is_accepted(tmp_path, standin, pki, kind):
    priv, pub = make_key(tmp_path / "keys", "ref-dev", kind)
    standin.register("ref-dev", pub)
    obs = standin.observer()
    script = tmp_path / "ref.py"
    script.write_text(reference_script(kind, "ref-dev", priv, pub, standin.port, pki.ca_cert))
    r = subprocess.run(["/usr/bin/python3", str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: ("/up/device/id/ref-dev", b'{"temperature":22}') in obs.received(), 10,
             what="the reference client's uplink")
    assert "standin: accepted client 'ref-dev'" in standin.log()


def b64(d):
    return base64.urlsafe_b64encode(d).rstrip(b"=").decode()


def connect_rc(port, cafile, client_id, password, username="unused"):
    rc = {}
    c = mqtt.Client(client_id=client_id, clean_session=True)
    c.username_pw_set(username, password)
    c.tls_set(ca_certs=str(cafile))
    c.on_connect = lambda cl, u, f, code: rc.setdefault("rc", code)
    c.on_disconnect = lambda cl, u, code: rc.setdefault("disc", code)
    try:
        c.connect("localhost", port, 30)
    except Exception as e:   # a refused connection is an answer here
        return f"error {e}"
    c.loop_start()
    try:
        wait_for(lambda: "rc" in rc or "disc" in rc, 10, what="CONNACK")
    finally:
        c.disconnect()
        c.loop_stop()
    return rc.get("rc", rc.get("disc"))


@pytest.fixture
def keys(tmp_path, standin):
    out = {}
    for dev, kind in (("dev-a", "ec"), ("dev-b", "rsa")):
        priv, pub = make_key(tmp_path / "k", dev, kind)
        standin.register(dev, pub)
        out[dev] = (priv.read_text(), pub.read_text(), "ES256" if kind == "ec" else "RS256")
    return out


def kid_of(pub_pem):
    import hashlib
    from Cryptodome.PublicKey import ECC, RSA
    try:
        k = ECC.import_key(pub_pem)
    except ValueError:
        k = RSA.import_key(pub_pem)
    return hashlib.sha256(k.export_key(format="DER")).hexdigest()


def token(keys, dev, claims=None, alg=None, key=None, kid=None, **over):
    priv, pub, a = keys[dev]
    now = int(time.time())
    c = {"iat": now, "exp": now + 1200, "aud": f"https://akenza.io/devices/{dev}"}
    c.update(claims or {})
    for k, v in over.items():
        if v is None:
            c.pop(k, None)
    return jwt.encode(c, key or priv, algorithm=alg or a, headers={"kid": kid or kid_of(pub)})


def test_good_tokens_accepted(keys, standin, pki):
    for dev in ("dev-a", "dev-b"):
        assert connect_rc(standin.port, pki.ca_cert, dev, token(keys, dev)) == 0


def tamper_sig(t):
    h, c, s = t.split(".")
    raw = bytearray(base64.urlsafe_b64decode(s + "=="))
    raw[5] ^= 1
    return ".".join([h, c, b64(bytes(raw))])


def tamper_claims(t):
    h, c, s = t.split(".")
    claims = json.loads(base64.urlsafe_b64decode(c + "=="))
    claims["exp"] += 3600
    return ".".join([h, b64(json.dumps(claims).encode()), s])


@pytest.mark.parametrize("case,reason", [
    ("tampered-signature", "bad signature"),
    ("tampered-claims", "bad signature"),
    ("expired", "token expired"),
    ("wrong-aud", "aud mismatch"),
    ("wrong-client-id", "kid belongs to another device"),
    ("unknown-kid", "unknown kid"),
    ("future-iat", "iat in the future"),
    ("too-long", "lifetime too long"),
    ("no-exp", "iat and exp must be integers"),
    ("hs256-confusion", "alg must be RS256 or ES256"),
    ("alg-none", "alg must be RS256 or ES256"),
    ("two-parts", "not a JWT"),
    ("bad-base64", "malformed header or claims"),
    ("not-json", "malformed header or claims"),
])
def test_bad_tokens_refused(keys, standin, pki, case, reason):
    dev, client = "dev-a", "dev-a"
    now = int(time.time())
    if case == "tampered-signature":
        t = tamper_sig(token(keys, dev))
    elif case == "tampered-claims":
        t = tamper_claims(token(keys, dev))
    elif case == "expired":
        t = token(keys, dev, {"iat": now - 2000, "exp": now - 10})
    elif case == "wrong-aud":
        t = token(keys, dev, {"aud": "https://akenza.io/devices/dev-b"})
    elif case == "wrong-client-id":
        t, client = token(keys, dev), "dev-b"
    elif case == "unknown-kid":
        t = token(keys, dev, kid="0" * 64)
    elif case == "future-iat":
        t = token(keys, dev, {"iat": now + 3600, "exp": now + 4800})
    elif case == "too-long":
        t = token(keys, dev, {"exp": now + 2 * 86400})
    elif case == "no-exp":
        t = token(keys, dev, exp=None)
    elif case == "hs256-confusion":
        # the classic attack: the public key used as an HMAC secret
        header = {"alg": "HS256", "typ": "JWT", "kid": kid_of(keys[dev][1])}
        signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps({'iat': now, 'exp': now + 60, 'aud': 'https://akenza.io/devices/dev-a'}).encode())}"
        import hmac, hashlib
        t = signing + "." + b64(hmac.new(keys[dev][1].encode(), signing.encode(), hashlib.sha256).digest())
    elif case == "alg-none":
        header = {"alg": "none", "typ": "JWT", "kid": kid_of(keys[dev][1])}
        t = f"{b64(json.dumps(header).encode())}.{b64(json.dumps({'iat': now, 'exp': now + 60, 'aud': 'https://akenza.io/devices/dev-a'}).encode())}."
    elif case == "two-parts":
        t = ".".join(token(keys, dev).split(".")[:2])
    elif case == "bad-base64":
        t = "!!!." + token(keys, dev).split(".", 1)[1]
    else:
        t = b64(b"{not json") + "." + token(keys, dev).split(".", 1)[1]
    rc = connect_rc(standin.port, pki.ca_cert, client, t)
    assert rc != 0, f"{case} accepted"
    standin.wait_log(f"refused client '{client}': {reason}")


def tls_client(keys, standin, pki, dev, lifetime=1200):
    c = mqtt.Client(client_id=dev, clean_session=True)
    now = int(time.time())
    c.username_pw_set("unused", token(keys, dev, {"iat": now, "exp": now + lifetime}))
    c.tls_set(ca_certs=str(pki.ca_cert))
    state = {}
    c.on_connect = lambda cl, u, f, rc: state.setdefault("rc", rc)
    c.on_disconnect = lambda cl, u, rc: state.setdefault("gone", time.time())
    c.connect("localhost", standin.port, 30)
    c.loop_start()
    wait_for(lambda: state.get("rc") == 0, 10, what="CONNACK")
    return c, state, now


def test_topic_acl(keys, standin, pki):
    obs = standin.observer()
    c, state, _ = tls_client(keys, standin, pki, "dev-a")
    c.publish("/up/device/id/dev-a", b"mine", 1).wait_for_publish(5)
    wait_for(lambda: ("/up/device/id/dev-a", b"mine") in obs.received(), 10, what="own uplink")
    # Mosquitto 2.0 acknowledges a denied QoS 1 publish of a 3.1.1 client, then drops the client
    c.publish("/up/device/id/dev-b", b"spoof", 1)
    standin.wait_log("standin: denied 'dev-a' on '/up/device/id/dev-b'")
    time.sleep(0.5)
    assert not [m for m in obs.received() if m[0] == "/up/device/id/dev-b"]
    c.loop_stop()


def test_disconnected_when_token_expires(keys, standin, pki):
    c, state, now = tls_client(keys, standin, pki, "dev-a", lifetime=3)
    try:
        wait_for(lambda: "gone" in state, 10, what="disconnect at token expiry")
        assert state["gone"] >= now + 2
        standin.wait_log("standin: token of 'dev-a' expired: disconnecting")
    finally:
        c.loop_stop()
