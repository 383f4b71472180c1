# SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause
# mosquitto-akenza: build, test, run.
#   make            build/mosquitto_akenza.so and build/akenzactl
#   make test       install what is missing, build, unit tests (plain and ASan+UBSan), integration tests,
#                   the container image built and run (make docker-integration)
#   make run        the demo round trip on localhost
#   make bench      benchmarks (not part of the tests)
# BUILD=dir puts the output elsewhere (the sanitizer build uses build/san).

BUILD    ?= build
CC       ?= cc
PYTHON   ?= /usr/bin/python3
# MOSQUITTO_DIR=<prefix> builds against the Mosquitto installed under <prefix> (include/, lib/),
# e.g. a 2.1 built from its source; by default against pkg-config's libmosquitto (Debian's 2.0).
# Either build loads into a 2.0 or a 2.1 broker: what differs is decided at run time.
MOSQUITTO_DIR ?=
ifeq ($(MOSQUITTO_DIR),)
PKGS     := libmosquitto libcjson openssl zlib
MOSQ_CFLAGS :=
MOSQ_LIBS :=
else
PKGS     := libcjson openssl zlib
MOSQ_CFLAGS := -I$(MOSQUITTO_DIR)/include
MOSQ_LIBS := -L$(MOSQUITTO_DIR)/lib -lmosquitto
endif
PKG_CFLAGS := $(MOSQ_CFLAGS) $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(MOSQ_LIBS) $(shell pkg-config --libs $(PKGS) 2>/dev/null)
# akenzactl alone speaks to akenza's REST API, with libcurl (OpenSSL flavour); the plugin never links it.
CURL_CFLAGS := $(shell pkg-config --cflags libcurl 2>/dev/null)
CURL_LIBS   := $(shell pkg-config --libs libcurl 2>/dev/null)

WARN     := -Wall -Wextra -Werror -Wshadow -Wformat=2 -Wstrict-prototypes -Wmissing-prototypes -Wvla
CFLAGS   ?= -O2 -g
SAN      ?=
ifeq ($(SAN),1)
SANFLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
endif
ifeq ($(SAN),thread)
SANFLAGS := -fsanitize=thread -fno-omit-frame-pointer
endif
# libFuzzer instrumentation (clang only): make fuzz builds with CC=clang BUILD=build/fuzz SAN=fuzz.
ifeq ($(SAN),fuzz)
SANFLAGS := -fsanitize=fuzzer-no-link,address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
endif
ALL_CFLAGS := -std=c11 -D_GNU_SOURCE -fPIC -fvisibility=hidden $(WARN) $(CFLAGS) $(SANFLAGS) -Iinclude $(PKG_CFLAGS)
LDLIBS   := $(PKG_LIBS) -lpthread

# Modules shared by the plugin, akenzactl and the unit tests: no broker calls in them.
SHARED   := util keystore keythread tss2 jwt mint passwd registry topic config queue tls spool regfile wakeup fds resolver tlsio x509 htab evloop conn window handoff
SHARED_OBJ := $(SHARED:%=$(BUILD)/obj/plugin/%.o)
PLUGIN_SRC := $(wildcard plugin/*.c)
PLUGIN_OBJ := $(PLUGIN_SRC:%.c=$(BUILD)/obj/%.o)
TOOL_SRC := $(wildcard tools/*.c)
TOOL_OBJ := $(TOOL_SRC:%.c=$(BUILD)/obj/%.o)
UNIT_SRC := $(wildcard tests/unit/test_*.c)
UNIT_BIN := $(UNIT_SRC:tests/unit/%.c=$(BUILD)/tests/%)
STANDIN_SRC := $(wildcard tests/standin/*.c)
SHIM_SRC := $(wildcard tests/shims/*.c)
BENCH_SRC := $(wildcard bench/*.c)
BENCH_BIN := $(BENCH_SRC:bench/%.c=$(BUILD)/bench/%)
BENCH_SHIM_SRC := $(wildcard bench/shims/*.c)
BENCH_SHIM_SO := $(BENCH_SHIM_SRC:bench/shims/%.c=$(BUILD)/bench/%.so)
FUZZ_SRC := $(wildcard fuzz/fuzz_*.c)
FUZZ_BIN := $(FUZZ_SRC:fuzz/%.c=$(BUILD)/%)
# Seconds each fuzz target runs in make fuzz: five targets, about a minute in all.
FUZZ_SECONDS ?= 10

.PHONY: all deps test unit san-unit integration san-integration tsan-integration run bench clean lint install \
	fuzz fuzz-bins valgrind-integration docker-integration

all: $(BUILD)/mosquitto_akenza.so $(BUILD)/akenzactl

$(BUILD)/obj/%.o: %.c $(wildcard include/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -c $< -o $@

$(BUILD)/mosquitto_akenza.so: $(PLUGIN_OBJ)
	$(CC) $(SANFLAGS) -shared -o $@ $^ $(LDLIBS)

$(TOOL_OBJ): ALL_CFLAGS += $(CURL_CFLAGS)

$(BUILD)/akenzactl: $(TOOL_OBJ) $(SHARED_OBJ)
	$(CC) $(SANFLAGS) -o $@ $^ $(LDLIBS) $(CURL_LIBS)

$(BUILD)/tests/%: tests/unit/%.c $(SHARED_OBJ)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -o $@ $^ $(LDLIBS) -lcmocka

# Test shims preloaded into brokers (a slow name server): never instrumented, they only wrap libc.
$(BUILD)/slow_dns.so: tests/shims/slow_dns.c
	$(CC) -std=c11 -D_GNU_SOURCE -fPIC -shared $(WARN) -O2 -o $@ $< -ldl

$(BUILD)/standin_auth.so: $(STANDIN_SRC) $(BUILD)/obj/plugin/topic.o
	$(CC) $(ALL_CFLAGS) -shared -o $@ $^ $(LDLIBS)

$(BUILD)/bench/%: bench/%.c $(SHARED_OBJ)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -o $@ $^ $(LDLIBS) -ljwt

# Shims preloaded into the benchmark's brokers (late acknowledgements, TCP_NODELAY): libc only.
$(BUILD)/bench/%.so: bench/shims/%.c
	@mkdir -p $(dir $@)
	$(CC) -std=c11 -D_GNU_SOURCE -fPIC -shared $(WARN) -O2 -o $@ $< -ldl -lpthread

$(BUILD)/fuzz_%: fuzz/fuzz_%.c fuzz/fuzz_common.h $(SHARED_OBJ)
	$(CC) $(ALL_CFLAGS) -fsanitize=fuzzer -o $@ $< $(SHARED_OBJ) $(LDLIBS)

# The control API target links control.c and status.c; it stubs the broker functions they call.
CONTROL_FUZZ_OBJ := $(BUILD)/obj/plugin/control.o $(BUILD)/obj/plugin/status.o
$(BUILD)/fuzz_control: fuzz/fuzz_control.c fuzz/fuzz_common.h $(CONTROL_FUZZ_OBJ) $(SHARED_OBJ)
	$(CC) $(ALL_CFLAGS) -fsanitize=fuzzer -o $@ $< $(CONTROL_FUZZ_OBJ) $(SHARED_OBJ) $(LDLIBS)

deps:
	@tools/install-deps.sh

# libFuzzer targets (fuzz/), built with clang, ASan and UBSan: replays fuzz/regressions/<target>/*
# first, then fuzzes each target for FUZZ_SECONDS. Any crash, leak or sanitizer report fails.
fuzz-bins: $(FUZZ_BIN)

fuzz:
	$(MAKE) BUILD=build/fuzz SAN=fuzz CC=clang fuzz-bins
	FUZZ_SECONDS=$(FUZZ_SECONDS) tools/fuzz.sh build/fuzz

unit: $(UNIT_BIN)
	@set -e; for t in $(UNIT_BIN); do echo "== $$t"; $$t; done

san-unit:
	$(MAKE) BUILD=build/san SAN=1 unit

# The token refresh tests (three refreshes of one device, one with a key in a TPM; 1,000 devices
# through one refresh cycle) spend minutes waiting for 60-second tokens to age, on little CPU: they run beside the
# rest of the suite. Each run has its own --basetemp (pytest's default one would let two
# concurrent runs delete each other's directories).
SLOW := token_refresh or thousand_devices or outage_log
integration: all $(BUILD)/standin_auth.so $(BUILD)/slow_dns.so
	@mkdir -p $(BUILD)/pytest; \
	AKZ_BUILD=$(abspath $(BUILD)) $(PYTHON) -m pytest -q -ra -s tests/test_bridge.py tests/test_scale.py tests/test_tpm.py \
		-k '$(SLOW)' --basetemp=$(abspath $(BUILD))/pytest/slow > $(BUILD)/pytest/slow.log 2>&1 & slow=$$!; \
	AKZ_BUILD=$(abspath $(BUILD)) $(PYTHON) -m pytest -q -ra tests/ -k 'not ($(SLOW))' \
		--ignore=tests/test_docker.py --basetemp=$(abspath $(BUILD))/pytest/main; rc=$$?; \
	wait $$slow; src=$$?; echo "== the token refresh tests:"; cat $(BUILD)/pytest/slow.log; \
	test $$rc -eq 0 && test $$src -eq 0

# The plugin built with ASan+UBSan, loaded into real brokers (the runtime preloaded): the
# edge, bridge and stand-in tests again, failing on any sanitizer report.
ASAN_RT = $(shell $(CC) -print-file-name=libasan.so)
san-integration:
	$(MAKE) BUILD=build/san SAN=1 all build/san/standin_auth.so build/san/slow_dns.so
	ASAN_OPTIONS=detect_leaks=0 AKZ_BROKER_PRELOAD=$(ASAN_RT) AKZ_BUILD=$(abspath build/san) \
		$(PYTHON) -m pytest -q -ra tests/test_bridge.py tests/test_edge_auth.py tests/test_standin.py \
		tests/test_spool.py tests/test_control.py tests/test_reload_storm.py tests/test_tpm.py \
		-k 'not token_refresh and not fifty_devices and not outage_log' --basetemp=$(abspath build/san)/pytest

# ThreadSanitizer on the broker-thread / bridge-thread / spool-flusher / key-thread hand-offs.
TSAN_RT = $(shell $(CC) -print-file-name=libtsan.so)
tsan-integration:
	$(MAKE) BUILD=build/tsan SAN=thread all build/tsan/standin_auth.so build/tsan/slow_dns.so
	AKZ_BROKER_PRELOAD=$(TSAN_RT) AKZ_BUILD=$(abspath build/tsan) \
		$(PYTHON) -m pytest -q -ra tests/test_bridge.py tests/test_spool.py tests/test_tpm.py \
		-k 'not token_refresh and not fifty_devices and not outage_log' --basetemp=$(abspath build/tsan)/pytest

# The plugin from the normal build inside a broker run under valgrind memcheck: start, traffic,
# a reload that adds, removes and disables devices, a clean stop; no errors, nothing definitely lost.
valgrind-integration: all $(BUILD)/standin_auth.so
	AKZ_VALGRIND=1 AKZ_BUILD=$(abspath $(BUILD)) $(PYTHON) -m pytest -q -ra --basetemp=$(abspath $(BUILD))/pytest-valgrind \
		tests/test_valgrind.py

# The image built from docker/Dockerfile and run as the README says, with docker and with
# docker-compose, on the host network against the akenza stand-in (tests/test_docker.py). Uses
# the Docker engine at $DOCKER_HOST or /var/run/docker.sock if one answers, else starts Debian's
# dockerd with its state in $(BUILD)/docker (no bridge, no iptables) and stops it at the end;
# debootstraps the debian:12-slim base image there if the engine has none.
docker-integration: all $(BUILD)/standin_auth.so
	@tools/install-deps.sh docker
	AKZ_BUILD=$(abspath $(BUILD)) $(PYTHON) -m pytest -q -ra tests/test_docker.py \
		--basetemp=$(abspath $(BUILD))/pytest-docker

test: deps
	$(MAKE) all
	$(MAKE) lint
	$(MAKE) unit
	$(MAKE) san-unit
	$(MAKE) integration
	$(MAKE) docker-integration
	$(MAKE) san-integration
	$(MAKE) tsan-integration
	$(MAKE) valgrind-integration
	$(MAKE) fuzz

run: deps all $(BUILD)/standin_auth.so
	AKZ_BUILD=$(abspath $(BUILD)) $(PYTHON) tools/demo.py

bench: deps all $(BENCH_BIN) $(BENCH_SHIM_SO)
	AKZ_BUILD=$(abspath $(BUILD)) $(PYTHON) bench/run.py $(BENCH_SECTIONS)

lint:
	clang-tidy --quiet $(PLUGIN_SRC) $(TOOL_SRC) $(STANDIN_SRC) $(SHIM_SRC) $(FUZZ_SRC) $(BENCH_SRC) $(BENCH_SHIM_SRC) -- -std=c11 -D_GNU_SOURCE -Iinclude $(PKG_CFLAGS)
	cppcheck --quiet --error-exitcode=1 --enable=warning,performance,portability --inline-suppr \
		--suppress=missingIncludeSystem -Iinclude plugin tools tests/standin tests/shims fuzz bench
	$(PYTHON) -m pyflakes tests/*.py bench/*.py tools/*.py

PREFIX ?= /usr/local
install: all
	install -d $(DESTDIR)$(PREFIX)/lib/mosquitto $(DESTDIR)$(PREFIX)/bin
	install -m 0644 $(BUILD)/mosquitto_akenza.so $(DESTDIR)$(PREFIX)/lib/mosquitto/
	install -m 0755 $(BUILD)/akenzactl $(DESTDIR)$(PREFIX)/bin/

clean:
	rm -rf $(BUILD) build
