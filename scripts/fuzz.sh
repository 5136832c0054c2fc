#!/bin/sh
# Build the libFuzzer drivers (spec/fuzz/fuzz_*.c) into build-fuzz/ and run
# them on a copy of the seed corpus, so the repository is never written to.
# The given seconds (default 30) are per parser: the three parser targets,
# the path normaliser and the re-framing differential share 3 x seconds in
# all (each gets 3/5). Exits non-zero when a fuzzer finds a crash; the
# reproducer is kept in build-fuzz/.
# Usage: scripts/fuzz.sh [seconds]
set -eu

secs=${1:-30}
per=$((secs * 3 / 5))
[ "$per" -ge 1 ] || per=1
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/build-fuzz"
cc=${FUZZ_CC:-clang}
flags="-std=c11 -D_GNU_SOURCE -g -O1 -fno-omit-frame-pointer -DMP_DEBUG"
flags="$flags -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined"

mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM

status=0
for t in http1 chunked reframe router path; do
    srcs="$root/src/http1.c $root/src/reframe.c $root/src/fuzz.c $root/src/util.c"
    libs=""
    if [ "$t" = router ]; then
        srcs="$root/src/router.c $root/src/regex.c $root/src/util.c"
        libs="-lpcre2-8"
    fi
    if [ "$t" = path ]; then
        srcs="$root/src/path.c $root/src/util.c"
    fi
    # shellcheck disable=SC2086
    $cc $flags -I"$root/src" -o "$out/fuzz_$t" $srcs "$root/spec/fuzz/fuzz_$t.c" $libs
    mkdir -p "$work/$t"
    cp "$root"/spec/fixtures/fuzz/http1/* "$work/$t/"
    if [ "$t" = chunked ] || [ "$t" = reframe ]; then
        cp "$root"/spec/fixtures/fuzz/chunked/* "$work/$t/"
    fi
    echo "fuzz: $t for ${per}s" >&2
    if ! UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 "$out/fuzz_$t" \
        -max_total_time="$per" -max_len=4096 -timeout=10 -print_final_stats=1 \
        -dict="$root/spec/fixtures/fuzz/http.dict" \
        -artifact_prefix="$out/$t-" "$work/$t" >"$work/$t.log" 2>&1; then
        tail -n 60 "$work/$t.log" >&2
        echo "fuzz: $t FAILED; reproducer in $out/$t-*" >&2
        status=1
    else
        grep -E '^(stat::number_of_executed_units|Done)' "$work/$t.log" >&2 || true
    fi
done
exit $status
