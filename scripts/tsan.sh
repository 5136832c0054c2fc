#!/bin/sh
# Build the shared-dict stress test (spec/c/shdict_stress.c) with
# ThreadSanitizer into build-tsan/ and run it: 4 threads for 2 seconds by
# default. Exits non-zero on a TSan report, a failed invariant or a build
# error. Usage: scripts/tsan.sh [seconds] [threads]   (CC=gcc|clang; default
# clang when installed)
set -eu

secs=${1:-2}
threads=${2:-4}
root=$(cd "$(dirname "$0")/.." && pwd)
out=${TSAN_BUILD:-$root/build-tsan}
if [ -z "${CC:-}" ]; then
    if command -v clang >/dev/null 2>&1; then CC=clang; else CC=gcc; fi
fi

mkdir -p "$out"
$CC -std=c11 -D_GNU_SOURCE -O1 -g -fno-omit-frame-pointer -fsanitize=thread -DMP_DEBUG \
    -Wall -Wextra -Wshadow -Werror -I"$root/src" -o "$out/shdict_stress" \
    "$root/src/shdict.c" "$root/src/util.c" "$root/spec/c/shdict_stress.c" -lpthread -lm

# halt_on_error: the first race fails the run with exitcode.
export TSAN_OPTIONS="halt_on_error=1 exitcode=66 second_deadlock_stack=1 ${TSAN_OPTIONS:-}"
run() { "$out/shdict_stress" "$secs" "$threads"; }
# TSan cannot map its shadow memory under the large mmap ASLR of some kernels
# ("unexpected memory mapping"); rerun without ASLR then.
if ! run 2>"$out/tsan.log"; then
    if grep -q 'unexpected memory mapping' "$out/tsan.log" && command -v setarch >/dev/null 2>&1; then
        setarch "$(uname -m)" -R "$out/shdict_stress" "$secs" "$threads"
        exit $?
    fi
    cat "$out/tsan.log" >&2
    exit 1
fi
cat "$out/tsan.log" >&2
