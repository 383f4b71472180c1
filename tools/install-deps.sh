#!/bin/sh
# SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause
# install-deps.sh - installs the Debian packages a part of the project needs, if missing.
#   tools/install-deps.sh [GROUP...]   groups: build, unit, test, docker; none given: build unit test
#   build   compile the plugin and akenzactl          unit    the cmocka unit tests
#   test    lint, sanitizers, integration tests (a software TPM for the TPM tests), fuzzing, the demo
#   docker  the container lane: Debian's Docker engine, debootstrap for its base image, docker-compose
set -eu
build="build-essential pkg-config libssl-dev libcjson-dev mosquitto-dev libmosquitto-dev zlib1g-dev
libcurl4-openssl-dev"
unit="libcmocka-dev openssl"
test="openssl mosquitto mosquitto-clients libjwt-dev python3 python3-pytest python3-paho-mqtt
python3-jwt python3-pycryptodome ca-certificates clang-tidy cppcheck clang valgrind libfaketime
python3-pyflakes docker-compose
swtpm swtpm-tools tpm2-openssl libtss2-tcti-swtpm0 tpm2-tools"
docker="docker.io debootstrap docker-compose"
[ $# -gt 0 ] || set -- build unit test
PKGS=""
for g in "$@"; do
	case "$g" in
	build) PKGS="$PKGS $build" ;;
	unit) PKGS="$PKGS $unit" ;;
	test) PKGS="$PKGS $test" ;;
	docker) PKGS="$PKGS $docker" ;;
	*) echo "install-deps: unknown group '$g' (build, unit, test, docker)" >&2; exit 2 ;;
	esac
done
missing=""
for p in $PKGS; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "install-deps: installing:$missing"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# Another apt-get holding the lock (an unattended upgrade, a parallel job) is waited for.
$SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
	--no-install-recommends $missing
