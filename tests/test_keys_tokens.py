# SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause
"""Keys and tokens against independent verifiers: PyJWT, pycryptodome and akenza's reference client."""
import base64
import datetime
import hashlib
import html
import os
import re
import subprocess
import sys
import types

import Cryptodome
import Cryptodome.PublicKey
import Cryptodome.PublicKey.ECC
import Cryptodome.PublicKey.RSA
import jwt
import pytest

from conftest import AKENZACTL, SHARED, run

REFERENCE = SHARED / "reference" / "000_d5ae0ccb724481ec.txt"


def openssl(*args):
    run(["openssl", *map(str, args)])


def make_forms(d, kind, bits=2048):
    """One key written in every PEM form we must read. Returns {form: path} and the public PEM."""
    d.mkdir(parents=True, exist_ok=True)
    base = d / "pkcs8.pem"
    if kind == "ec":
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", base)
    else:
        openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{bits}", "-out", base)
    forms = {"pkcs8": base}
    if kind == "ec":
        forms["sec1"] = d / "sec1.pem"
        openssl("ec", "-in", base, "-out", forms["sec1"])
        forms["sec1-compressed"] = d / "sec1c.pem"
        openssl("ec", "-in", base, "-conv_form", "compressed", "-out", forms["sec1-compressed"])
    else:
        forms["pkcs1"] = d / "pkcs1.pem"
        openssl("pkey", "-in", base, "-traditional", "-out", forms["pkcs1"])
    (d / "pass").write_text("correct horse battery staple\n")
    forms["pkcs8-encrypted"] = d / "enc.pem"
    openssl("pkcs8", "-topk8", "-in", base, "-v2", "aes-256-cbc", "-passout", f"file:{d / 'pass'}",
            "-out", forms["pkcs8-encrypted"])
    pub = d / "pub.pem"
    openssl("pkey", "-in", base, "-pubout", "-out", pub)
    if kind == "ec":
        pubc = d / "pubc.pem"
        openssl("ec", "-in", base, "-pubout", "-conv_form", "compressed", "-out", pubc)
        forms["_pub_compressed"] = pubc
    for p in d.iterdir():
        os.chmod(p, 0o600)
    return forms, pub


def pycryptodome_kid(pub_pem, kind):
    mod = Cryptodome.PublicKey.ECC if kind == "ec" else Cryptodome.PublicKey.RSA
    return hashlib.sha256(mod.import_key(pub_pem.read_text()).export_key(format="DER")).hexdigest()


def ctl(*args, **kw):
    return subprocess.run([str(AKENZACTL), *map(str, args)], capture_output=True, text=True, timeout=60, **kw)


CASES = [("ec", 256), ("rsa", 2048), ("rsa", 3072), ("rsa", 4096)]


@pytest.mark.parametrize("kind,bits", CASES, ids=[f"{k}{b}" for k, b in CASES])
def test_every_form_mints_tokens_pyjwt_accepts(tmp_path, kind, bits):
    forms, pub = make_forms(tmp_path, kind, bits)
    alg = "ES256" if kind == "ec" else "RS256"
    want_kid = pycryptodome_kid(pub, kind)
    for form, path in forms.items():
        if form.startswith("_"):
            continue
        extra = ["--passphrase-file", tmp_path / "pass"] if "encrypted" in form else []
        r = ctl("token", "--device", "dev-1", "--key", path, *extra)
        assert r.returncode == 0, f"{form}: {r.stderr}"
        tok = r.stdout.strip()
        claims = jwt.decode(tok, pub.read_text(), algorithms=[alg], audience="https://akenza.io/devices/dev-1")
        assert claims["exp"] - claims["iat"] == 1200
        assert abs(claims["iat"] - datetime.datetime.now().timestamp()) < 5
        assert all(isinstance(claims[k], int) for k in ("iat", "exp"))
        header = jwt.get_unverified_header(tok)
        assert header == {"alg": alg, "typ": "JWT", "kid": want_kid}, form
        assert "=" not in tok
        if kind == "ec":
            assert len(base64.urlsafe_b64decode(tok.split(".")[2] + "==")) == 64
        r = ctl("fingerprint", path, *extra)
        assert r.returncode == 0 and r.stdout.strip() == want_kid, f"{form}: {r.stderr}"
    # public keys, also with a compressed point, give the same kid
    assert ctl("fingerprint", pub).stdout.strip() == want_kid
    if kind == "ec":
        assert ctl("fingerprint", forms["_pub_compressed"]).stdout.strip() == want_kid
        assert pycryptodome_kid(forms["_pub_compressed"], kind) == want_kid


def test_lifetime_option_and_bounds(tmp_path):
    forms, pub = make_forms(tmp_path, "ec")
    tok = ctl("token", "--device", "d", "--key", forms["pkcs8"], "--lifetime", "86400").stdout.strip()
    c = jwt.decode(tok, pub.read_text(), algorithms=["ES256"], audience="https://akenza.io/devices/d")
    assert c["exp"] - c["iat"] == 86400
    for bad in ("59", "86401", "abc"):
        r = ctl("token", "--device", "d", "--key", forms["pkcs8"], "--lifetime", bad)
        assert r.returncode == 2 and "--lifetime" in r.stderr


def test_device_ids_needing_escapes(tmp_path):
    forms, pub = make_forms(tmp_path, "ec")
    for dev in ['a"b', "a\\b", "Zürich-ü-1", "x y"]:
        r = ctl("token", "--device", dev, "--key", forms["pkcs8"])
        assert r.returncode == 0, r.stderr
        c = jwt.decode(r.stdout.strip(), pub.read_text(), algorithms=["ES256"],
                       audience=f"https://akenza.io/devices/{dev}")
        assert c["aud"].endswith(dev)
    r = ctl("token", "--device", "a\x01b", "--key", forms["pkcs8"])
    assert r.returncode == 1 and "control character" in r.stderr
    r = subprocess.run([str(AKENZACTL).encode(), b"token", b"--device", b"a\xffb", b"--key", str(forms["pkcs8"]).encode()],
                       capture_output=True, timeout=30)
    assert r.returncode == 1 and b"UTF-8" in r.stderr


def load_reference():
    """akenza's reference client's create_jwt and get_public_key_fingerprint, for RSA and EC, as
    published (the RSA one inside an HTML <pre>), with Debian's Cryptodome standing in for Crypto."""
    text = REFERENCE.read_text()
    rsa_block = re.search(r'<pre class="language-python".*?<code class="lang-python">(.*?)</code></pre>', text, re.S).group(1)
    rsa_src = html.unescape(re.sub(r"<[^>]+>", "", rsa_block))
    ec_src = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    sys.modules.setdefault("Crypto", Cryptodome)
    sys.modules.setdefault("Crypto.PublicKey", Cryptodome.PublicKey)
    out = {}
    for name, src in (("rsa", rsa_src), ("ec", ec_src)):
        # keep the definitions, drop the module-level publish (no network here)
        defs = src.split("tls_config = {")[0]
        ns = {}
        exec(compile(defs, f"reference-{name}", "exec"), ns)
        out[name] = ns
    return out


class FrozenDatetime(datetime.datetime):
    frozen = None

    @classmethod
    def now(cls, tz=None):
        return cls.frozen


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_same_header_and_claims_as_reference_client(tmp_path, kind):
    forms, pub = make_forms(tmp_path, kind)
    ref = load_reference()[kind]
    # freeze the reference's clock on a whole second and mint ours in that same second
    for _ in range(20):
        now = int(datetime.datetime.now().timestamp())
        r = ctl("token", "--device", "dev-ref", "--key", forms["pkcs8"])
        if int(datetime.datetime.now().timestamp()) == now:
            break
    ours = r.stdout.strip()
    FrozenDatetime.frozen = datetime.datetime.fromtimestamp(now, tz=datetime.timezone.utc)
    ref["datetime"] = types.SimpleNamespace(datetime=FrozenDatetime, timezone=datetime.timezone,
                                            timedelta=datetime.timedelta)
    theirs = ref["create_jwt"]("dev-ref", str(forms["pkcs8"]), str(pub))
    assert jwt.get_unverified_header(ours) == jwt.get_unverified_header(theirs)
    assert jwt.decode(ours, options={"verify_signature": False}) == jwt.decode(theirs, options={"verify_signature": False})
    # the same bytes before the signature; RSA PKCS#1 v1.5 is deterministic, so the whole token
    assert ours.split(".")[:2] == theirs.split(".")[:2]
    if kind == "rsa":
        assert ours == theirs
    assert ref["get_public_key_fingerprint"](str(pub)) == jwt.get_unverified_header(ours)["kid"]


REFUSALS = {
    "rsa1024": ("RSA key of 1024 bits", ["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"]),
    "p384": ("EC curve secp384r1", ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"]),
    "ed25519": ("ED25519 key", ["genpkey", "-algorithm", "ED25519"]),
    "dsa": ("DSA key", None),
}


@pytest.mark.parametrize("case", ["rsa1024", "p384", "ed25519", "dsa", "public", "cert", "garbage",
                                  "empty", "directory", "readable", "encrypted-no-pass", "wrong-pass",
                                  "missing"])
def test_refused_keys(tmp_path, case):
    key = tmp_path / "k.pem"
    extra = []
    if case in ("rsa1024", "p384", "ed25519"):
        want, cmd = REFUSALS[case]
        openssl(*cmd, "-out", key)
    elif case == "dsa":
        want = "DSA key"
        openssl("genpkey", "-genparam", "-algorithm", "DSA", "-pkeyopt", "dsa_paramgen_bits:2048", "-out", tmp_path / "p")
        openssl("genpkey", "-paramfile", tmp_path / "p", "-out", key)
    elif case in ("public", "cert"):
        priv = tmp_path / "priv.pem"
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", priv)
        if case == "public":
            openssl("pkey", "-in", priv, "-pubout", "-out", key)
            want = "public key but no private key"
        else:
            openssl("req", "-x509", "-new", "-key", priv, "-subj", "/CN=x", "-out", key)
            want = "certificate but no private key"
    elif case == "garbage":
        key.write_bytes(os.urandom(300))
        want = "no private key found"
    elif case == "empty":
        key.write_bytes(b"")
        want = "empty file"
    elif case == "directory":
        key = tmp_path / "dir.pem"
        key.mkdir()
        want = "is a directory"
    elif case == "missing":
        key = tmp_path / "nope.pem"
        want = "No such file"
    elif case == "readable":
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key)
        os.chmod(key, 0o644)
        want = "mode 0644: group or others can read it"
    else:
        forms, _ = make_forms(tmp_path / "f", "ec")
        key = forms["pkcs8-encrypted"]
        if case == "encrypted-no-pass":
            want = "the key is encrypted"
        else:
            (tmp_path / "wrong").write_text("not the passphrase\n")
            extra = ["--passphrase-file", tmp_path / "wrong"]
            want = "wrong passphrase"
    if case != "directory" and key.exists() and key.is_file():
        os.chmod(key, 0o644 if case == "readable" else 0o600)
    for cmd in (["token", "--device", "d", "--key", key, *extra], ["fingerprint", key, *extra]):
        r = ctl(*cmd)
        if cmd[0] == "fingerprint" and case in ("public", "cert", "readable"):
            continue   # fingerprint reads public keys (and is not fooled by permissions on them)
        assert r.returncode == 1, f"{case}: {cmd[0]} exit {r.returncode}: {r.stderr}"
        assert want in r.stderr, f"{case}: {r.stderr!r}"
        assert str(key) in r.stderr
        assert "Traceback" not in r.stderr and r.stdout == ""


def test_readable_key_allowed_with_option(tmp_path):
    key = tmp_path / "k.pem"
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key)
    os.chmod(key, 0o640)
    assert ctl("token", "--device", "d", "--key", key).returncode == 1
    assert ctl("token", "--device", "d", "--key", key, "--allow-readable").returncode == 0


@pytest.mark.parametrize("kind,bits", [("ec", None), ("rsa", "3072")])
def test_keygen(tmp_path, kind, bits):
    extra = ["--bits", bits] if bits else []
    r = ctl("keygen", "--device", "gen-1", "--type", kind, "--out", tmp_path, *extra)
    assert r.returncode == 0, r.stderr
    kid = r.stdout.strip()
    priv, pub = tmp_path / "gen-1.pem", tmp_path / "gen-1.pub.pem"
    assert (priv.stat().st_mode & 0o777) == 0o600
    assert pycryptodome_kid(pub, kind) == kid
    if bits:
        assert Cryptodome.PublicKey.RSA.import_key(pub.read_text()).size_in_bits() == 3072
    tok = ctl("token", "--device", "gen-1", "--key", priv).stdout.strip()
    jwt.decode(tok, pub.read_text(), algorithms=["ES256" if kind == "ec" else "RS256"],
               audience="https://akenza.io/devices/gen-1")
    # never overwrites a key
    r = ctl("keygen", "--device", "gen-1", "--type", kind, "--out", tmp_path)
    assert r.returncode == 1 and "already exists" in r.stderr
    assert pycryptodome_kid(pub, kind) == kid
    for bad in (["--device", "../x", "--type", "ec", "--out", tmp_path],
                ["--device", "x", "--type", "dsa", "--out", tmp_path],
                ["--device", "x", "--type", "rsa", "--bits", "1024", "--out", tmp_path]):
        assert ctl("keygen", *bad).returncode == 2


def test_help_everywhere():
    assert ctl("--help").returncode == 0
    for c in ("keygen", "fingerprint", "token", "passwd", "check-registry"):
        r = ctl(c, "--help")
        assert r.returncode == 0 and "usage: akenzactl " + c in r.stdout
    r = ctl("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr
