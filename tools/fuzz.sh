#!/bin/sh
# fuzz.sh BUILD_DIR - replays the regression inputs, then runs every libFuzzer target for
# FUZZ_SECONDS (default 12). Exits non-zero on the first target that crashes, leaks or trips a
# sanitizer; the crashing input is left in BUILD_DIR/artifacts/. Used by `make fuzz`.
set -eu
B=${1:-build/fuzz}
SECONDS_EACH=${FUZZ_SECONDS:-12}
mkdir -p "$B/artifacts"
for bin in "$B"/fuzz_*; do
	t=$(basename "$bin" | sed 's/^fuzz_//')
	case $t in
	spool) maxlen=65536 ;;
	registry) maxlen=16384 ;;
	config) maxlen=4096 ;;
	*) maxlen=1024 ;;
	esac
	# Regression inputs: each once, as files (libFuzzer runs file arguments and stops).
	if ls fuzz/regressions/"$t"/* >/dev/null 2>&1; then
		echo "== fuzz_$t: replaying fuzz/regressions/$t"
		"$bin" -rss_limit_mb=2048 fuzz/regressions/"$t"/*
	fi
	echo "== fuzz_$t: ${SECONDS_EACH}s"
	mkdir -p "$B/corpus/$t"
	# The first corpus directory receives new inputs; the seeds in fuzz/corpus stay as they are.
	"$bin" -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 -max_len="$maxlen" -timeout=10 \
		-print_final_stats=1 -artifact_prefix="$B/artifacts/$t-" "$B/corpus/$t" "fuzz/corpus/$t"
done
