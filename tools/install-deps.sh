#!/bin/sh
# install-deps.sh - installs the Debian packages the build, the tests and the demo need, if missing.
set -eu
PKGS="build-essential pkg-config openssl libssl-dev libcjson-dev mosquitto mosquitto-dev
libmosquitto-dev mosquitto-clients libcmocka-dev libjwt-dev python3 python3-pytest
python3-paho-mqtt python3-jwt python3-pycryptodome ca-certificates clang-tidy cppcheck
docker-compose zlib1g-dev clang valgrind libfaketime python3-pyflakes
swtpm swtpm-tools tpm2-openssl libtss2-tcti-swtpm0 tpm2-tools"
missing=""
for p in $PKGS; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "install-deps: installing:$missing"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
