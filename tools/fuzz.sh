#!/bin/sh
# SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause
# fuzz.sh BUILD_DIR - for every libFuzzer target in BUILD_DIR: replays fuzz/regressions/<target>/*,
# then fuzzes for FUZZ_SECONDS (default 12) from the seeds in fuzz/corpus/<target>/ plus what
# earlier runs found (BUILD_DIR/corpus/<target>/). A crash, leak, timeout, out-of-memory or
# sanitizer report fails the target (its input is left in BUILD_DIR/artifacts/); every target
# runs, and the script exits non-zero if any failed. Used by `make fuzz`.
set -u
B=${1:-build/fuzz}
SECONDS_EACH=${FUZZ_SECONDS:-12}
mkdir -p "$B/artifacts"
failed=""
for bin in "$B"/fuzz_*; do
	[ -x "$bin" ] || continue
	t=$(basename "$bin" | sed 's/^fuzz_//')
	case $t in
	spool) maxlen=65536 ;;
	registry) maxlen=16384 ;;
	config|control) maxlen=4096 ;;
	*) maxlen=1024 ;;
	esac
	# Regression inputs: each run once (libFuzzer runs file arguments and stops).
	if ls fuzz/regressions/"$t"/* >/dev/null 2>&1; then
		echo "== fuzz_$t: replaying fuzz/regressions/$t"
		if ! "$bin" -rss_limit_mb=2048 -timeout=10 fuzz/regressions/"$t"/*; then
			failed="$failed $t(regression)"
			continue
		fi
	fi
	echo "== fuzz_$t: ${SECONDS_EACH}s"
	mkdir -p "$B/corpus/$t"
	# The first corpus directory receives new inputs; the seeds in fuzz/corpus stay as they are.
	if ! "$bin" -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 -max_len="$maxlen" -timeout=10 \
			-print_final_stats=1 -artifact_prefix="$B/artifacts/$t-" "$B/corpus/$t" "fuzz/corpus/$t"; then
		failed="$failed $t"
	fi
done
if [ -n "$failed" ]; then
	echo "fuzz: FAILED:$failed (inputs in $B/artifacts/)" >&2
	exit 1
fi
echo "fuzz: all targets passed"
