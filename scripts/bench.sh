#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# scripts/bench.sh [BIN] — moonproxy against nginx and HAProxy, on loopback.
#
# Puts each proxy in turn in front of the same fast backend (an nginx that
# answers "hello world\n" itself), with the same number of workers, and drives
# it with wrk. For every proxy and client concurrency it reports throughput,
# p50/p99 latency, the proxy's CPU time per request (the figure that survives a
# noisy shared machine best: it does not depend on how much CPU wrk and the
# backend took from us) and how many upstream connections the proxy opened
# during the measured run (0 or few means the keep-alive pool works). It then
# holds IDLE_CONNS idle keep-alive client connections on each proxy and reports
# the RSS they cost. Results go to stdout and to build/bench-results.md.
#
# Environment:
#   WORKERS=2            worker threads/processes for every proxy
#   CONNS="1 10 100"     wrk client connection counts
#   DURATION=10s         each measured wrk run (WARMUP=1s before it)
#   IDLE_CONNS=9000      idle connections for the memory figure (0 = skip)
#   PROXIES="nginx haproxy moonproxy"   which proxies, in this order (also
#                        moonproxy-noop, moonproxy-hdr, nginx-lua: see Hooks)
#   SKIP_MOONPROXY=1     leave moonproxy out (also automatic when BIN is missing)
#   BASELINE=PATH        another moonproxy binary (the build before a change): adds
#                        the row moonproxy-base, that binary with the same config and
#                        the same Lua directory (MOONPROXY_LUA_PATH=lua/ of this tree
#                        for both), measured in the same run right after moonproxy,
#                        and the ratio moonproxy ÷ moonproxy-base of CPU µs/request at
#                        each connection count; with CALLGRIND=1, of Ir/request. Also
#                        with BODY=chunked and MALLOC_CHECK=1; not in the hooks part,
#                        but HOOKS=1 PROXIES="moonproxy moonproxy-base" drives the two
#                        builds in interleaved rounds (column "vs moonproxy no hook":
#                        old ÷ new), which a drifting load on the machine hits alike.
#   BODY=chunked         every request a POST with a 4 KiB chunked body (four
#                        chunks, one with an extension): what the proxy decodes
#                        and re-frames; nginx buffers it and sends
#                        Content-Length, HAProxy re-frames as it streams. No
#                        idle or hooks part; to build/bench-chunked.md.
#                        BODY=chunked-trailer adds a trailer field.
#   OUT=build/bench-results.md  (profiling modes: build/bench-callgrind.md,
#                                build/bench-malloc.md)
# Profiling modes (they replace the comparison run, and take PROXIES too):
#   CALLGRIND=1      each proxy with 1 worker (moonproxy -w 1) under callgrind:
#                    instructions per request in steady state, top functions;
#                    profiles kept in build/callgrind.out.<proxy>
#   MALLOC_CHECK=1   malloc/calloc/realloc calls per request in steady state,
#                    via an LD_PRELOAD counter (nginx and HAProxy for reference)
#
# Hooks (what a Lua hook costs per request, against nginx + lua-nginx-module):
#   HOOKS=1          five configurations, all started at once and measured in
#                    interleaved rounds (so drifting load on the machine hits
#                    them alike), wrk at HOOK_CONNS, requests carrying
#                    User-Agent, Accept, Accept-Encoding and Accept-Language:
#                      moonproxy        no hook (the plain config)
#                      moonproxy-noop   proxy.on_request(function(req) end)
#                      moonproxy-hdr    on_request reading user-agent and
#                                       accept, setting x-seen
#                      nginx-lua        the default run's nginx config (upstream
#                                       keepalive, reuseport) + the same work
#                                       in access_by_lua_block
#                      nginx            plain, for reference
#                    Reports trivial hook ÷ no hook (target <= 1.10) and header
#                    hook ÷ nginx+lua (target <= 0.8) in CPU µs/request; to
#                    build/bench-hooks.md. About 4 min (HOOK_ROUNDS=3 of
#                    HOOK_DURATION=6s). Before measuring, each configuration is
#                    checked to do the work: the backend echoes x-seen back.
#   HOOKS=1 CALLGRIND=1  the three moonproxy configurations (and nginx-lua for
#                    reference) under callgrind: instructions/request, the
#                    exact figure, plus the inclusive cost of the hook entry
#                    (mp_hook_pre + mp_hook_release); build/bench-hooks-callgrind.md,
#                    profiles in build/callgrind.out.hooks-<config>.
# TLS=1 CALLGRIND=1: instructions per TLS handshake (full and resumed, each key),
#   each proxy with one worker under callgrind (scripts/bench/tls.sh).
# TLS (scripts/bench/tls.sh): TLS=1 puts nginx, HAProxy and moonproxy behind a
#   TLS listener (same certificates, RSA 2048 and ECDSA P-256): keep-alive
#   requests at TLS_CONNS="10 100", full and resumed handshakes per second
#   (openssl s_time), idle memory per TLS connection (TLS_IDLE_CONNS=2000), at
#   TLS_WORKERS="1 2"; to build/bench-tls.md. About 7 min.
#   The default run ends with a short version of HOOKS=1 (HOOK_ROUNDS=2 of
#   3 s, about 80 s; whole default run about 3.5 min, under 4), appended to OUT and
#   written to build/bench-hooks.md; SHORT_HOOKS=0 leaves it out.
#   HOOK_PROXIES, HOOK_CONNS="10 100", HOOK_ROUNDS, HOOK_DURATION
#
# The modes live in scripts/bench/, one file each, sourced here: compare.sh (the
# default run), chunked.sh (BODY=chunked*), hooks.sh (HOOKS=1, and the short hooks
# part of the default run), callgrind.sh (CALLGRIND=1), malloc.sh (MALLOC_CHECK=1,
# with its counter malloc_count.c), tls.sh (TLS=1); what they share is in proxies.sh (wrk, the
# backend, the proxies) and lib.sh (processes, ports, /proc, nginx and HAProxy
# configs; also used by scripts/bench/reload.sh and scripts/bench/tail.sh, which
# run on their own).
#
# Every process started here is stopped by PID on exit, and the temp dir goes.
set -Eeuo pipefail
BENCH_NAME=bench
BENCH_DIR=$(cd "$(dirname "$0")/bench" && pwd)
# shellcheck source=bench/lib.sh
. "$BENCH_DIR/lib.sh"
# shellcheck source=bench/proxies.sh
. "$BENCH_DIR/proxies.sh"
# shellcheck source=bench/compare.sh
. "$BENCH_DIR/compare.sh"
# shellcheck source=bench/chunked.sh
. "$BENCH_DIR/chunked.sh"
# shellcheck source=bench/hooks.sh
. "$BENCH_DIR/hooks.sh"
# shellcheck source=bench/callgrind.sh
. "$BENCH_DIR/callgrind.sh"
# shellcheck source=bench/malloc.sh
. "$BENCH_DIR/malloc.sh"
# shellcheck source=bench/tls.sh
. "$BENCH_DIR/tls.sh"
# A failing command would otherwise end the run silently (set -e).
trap 'log "bench: failed at line $LINENO: $BASH_COMMAND"' ERR

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/build/moonproxy}
[[ $BIN == /* ]] || BIN=$PWD/$BIN
BASELINE=${BASELINE:-}
if [[ -n $BASELINE ]]; then
    [[ $BASELINE == /* ]] || BASELINE=$PWD/$BASELINE
    # The same Lua directory for both builds: only the binaries differ.
    export MOONPROXY_LUA_PATH=${MOONPROXY_LUA_PATH:-$ROOT/lua}
fi

WORKERS=${WORKERS:-2}
CONNS=${CONNS:-1 10 100}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-1s}
IDLE_CONNS=${IDLE_CONNS:-9000}
CALLGRIND=${CALLGRIND:-0}
MALLOC_CHECK=${MALLOC_CHECK:-0}
HOOKS=${HOOKS:-0}
TLS=${TLS:-0}
BODY=${BODY:-}
if [[ $BODY == chunked* ]]; then   # the body run: no idle-memory or hooks part
    IDLE_CONNS=0 SHORT_HOOKS=0
fi
SHORT_HOOKS=${SHORT_HOOKS:-1}
HOOK_CONNS=${HOOK_CONNS:-10 100}
if [[ $HOOKS == 1 ]]; then
    HOOK_ROUNDS=${HOOK_ROUNDS:-3} HOOK_DURATION=${HOOK_DURATION:-6s}
else
    HOOK_ROUNDS=${HOOK_ROUNDS:-2} HOOK_DURATION=${HOOK_DURATION:-3s}
fi
HOOK_PROXIES=${HOOK_PROXIES:-moonproxy moonproxy-noop moonproxy-hdr nginx-lua nginx}
if [[ $HOOKS == 1 && $CALLGRIND == 1 ]]; then
    PROXIES=${PROXIES:-moonproxy moonproxy-noop moonproxy-hdr nginx-lua}
elif [[ $HOOKS == 1 ]]; then
    HOOK_PROXIES=${PROXIES:-$HOOK_PROXIES}   # PROXIES= picks among the five
fi
PROXIES=${PROXIES:-nginx haproxy moonproxy}
# BASELINE: moonproxy-base right after moonproxy (not in the hooks part).
if [[ -n $BASELINE && $HOOKS != 1 && " $PROXIES " == *" moonproxy "* && " $PROXIES " != *" moonproxy-base "* ]]; then
    PROXIES=$(awk '{ for (i = 1; i <= NF; i++) { printf "%s%s", sep, $i; sep = " "; if ($i == "moonproxy") printf " moonproxy-base" } }' <<<"$PROXIES")
fi
HOOKS_OUT=${HOOKS_OUT:-$ROOT/build/bench-hooks.md}
# The profiling modes write their own file: they must not clobber a comparison.
if [[ $HOOKS == 1 && $CALLGRIND == 1 ]]; then OUT=${OUT:-$ROOT/build/bench-hooks-callgrind.md}
elif [[ $TLS == 1 && $CALLGRIND == 1 ]]; then OUT=${OUT:-$ROOT/build/bench-tls-callgrind.md}
elif [[ $CALLGRIND == 1 ]]; then OUT=${OUT:-$ROOT/build/bench-callgrind.md}
elif [[ $MALLOC_CHECK == 1 ]]; then OUT=${OUT:-$ROOT/build/bench-malloc.md}
elif [[ $TLS == 1 ]]; then OUT=${OUT:-$ROOT/build/bench-tls.md}
elif [[ $HOOKS == 1 ]]; then OUT=${OUT:-$HOOKS_OUT}
elif [[ $BODY == chunked* ]]; then OUT=${OUT:-$ROOT/build/bench-$BODY.md}
else OUT=${OUT:-$ROOT/build/bench-results.md}; fi

NGINX=${NGINX:-/usr/sbin/nginx}
HAPROXY=${HAPROXY:-/usr/sbin/haproxy}
WRK=${WRK:-wrk}
LUAJIT=${LUAJIT:-luajit}
IDLE_SCRIPT=$ROOT/scripts/idle_conns.lua
CLK_TCK=$(getconf CLK_TCK)

bench_tmpdir moonproxy-bench

# die MESSAGE [LOGFILE]: print the message (and the tail of a server's log,
# which is about to vanish with the temp dir) and exit; the EXIT trap cleans up.
die() {
    log "bench: $1"
    if [[ -n ${2:-} && -s $2 ]]; then
        log "--- last lines of $(basename "$2"):"
        tail -n 20 "$2" >&2
    fi
    exit 1
}

[[ $BODY == chunked* ]] && chunked_wrk_args

# ---------------------------------------------------------------------------

STATUS=0
main() {
    command -v "$WRK" >/dev/null || die "wrk missing (scripts/deps.sh bench)"
    [[ -x $NGINX ]] || die "$NGINX missing (scripts/deps.sh bench)"
    # Every client and idle connection is a descriptor; take what the hard limit allows.
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    mkdir -p "$(dirname "$OUT")"
    if [[ $CALLGRIND == 1 && $TLS == 1 ]]; then
        tls_callgrind_mode
    elif [[ $CALLGRIND == 1 ]]; then
        callgrind_mode
    elif [[ $MALLOC_CHECK == 1 ]]; then
        malloc_mode
    elif [[ $TLS == 1 ]]; then
        [[ -x $HAPROXY ]] || die "$HAPROXY missing (scripts/deps.sh bench)"
        tls_mode
    elif [[ $HOOKS == 1 ]]; then
        hooks_bench
        hooks_report | tee "$OUT"
        log "written to $OUT"
    else
        [[ -x $HAPROXY ]] || die "$HAPROXY missing (scripts/deps.sh bench)"
        command -v "$LUAJIT" >/dev/null || die "luajit missing (scripts/deps.sh test)"
        compare
        if [[ $SHORT_HOOKS == 1 ]]; then
            hooks_bench
            hooks_report >"$TMP/hooks.md"
            { echo; cat "$TMP/hooks.md"; } >>"$OUT"
            cp "$TMP/hooks.md" "$HOOKS_OUT"
            cat "$TMP/hooks.md"
            log "hooks: appended to $OUT and written to $HOOKS_OUT"
        fi
    fi
    exit "$STATUS"
}

main "$@"
