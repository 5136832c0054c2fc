#!/bin/sh
# Install the Debian packages moonproxy needs to build, test and benchmark.
# Idempotent: installs only what is missing. Usage: scripts/deps.sh [build|test|bench|browser|all]
set -eu

want=${1:-test}
build_pkgs="build-essential luajit2 libluajit2-5.1-dev libev-dev libpcre2-dev libssl-dev libc-ares-dev libhiredis-dev libsystemd-dev zlib1g-dev libbrotli-dev libzstd-dev"
test_pkgs="redis-server lua-busted lua-socket lua-sec lua-cjson openssl curl clang libclang-rt-14-dev luarocks lua-check clang-format brotli zstd"
bench_pkgs="wrk nginx libnginx-mod-http-lua haproxy valgrind"
browser_pkgs="chromium" # make test-browser: the status page rendered headless

case "$want" in
build) pkgs="$build_pkgs" ;;
test) pkgs="$build_pkgs $test_pkgs" ;;
bench) pkgs="$build_pkgs $test_pkgs $bench_pkgs" ;;
browser) pkgs="$build_pkgs $test_pkgs $browser_pkgs" ;;
all) pkgs="$build_pkgs $test_pkgs $bench_pkgs $browser_pkgs" ;;
*) echo "usage: $0 [build|test|bench|browser|all]" >&2; exit 2 ;;
esac

missing=""
for p in $pkgs; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed'; then
        missing="$missing $p"
    fi
done
[ -z "$missing" ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "deps: installing$missing" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# shellcheck disable=SC2086
$sudo apt-get install -y -qq --no-install-recommends $missing >&2
