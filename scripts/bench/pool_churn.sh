#!/usr/bin/env bash
# scripts/bench/pool_churn.sh [BIN] — upstream connections opened under a
# steady keep-alive load larger than the pool (issue 12, "Pool churn").
#
# The fast backend of scripts/bench.sh (an nginx, 1 worker, "hello world\n",
# stub_status), with in front of it, one at a time and with the same worker
# count: moonproxy (`keepalive = 64`), nginx (upstream `keepalive 64`,
# reuseport) and HAProxy (`http-reuse always`); the configurations are
# scripts/bench/proxies.sh's. Each is driven by wrk -c CONNS -d DURATION from
# its start (no warm-up: the first connections count too). "Opened" is the
# backend's stub_status `accepts` over that run (exact, unlike sampling
# ss or /proc/net/tcp; the stub_status queries themselves are left out).
# "Held after" is the backend's `Active connections` right after the run and
# SETTLE seconds later: what each proxy keeps idle (moonproxy: the surplus
# past keepalive closes after 1 s idle, pool.h). The target: moonproxy opens
# at most 2 x what HAProxy opens.
#
# With CONNS above WORKERS x 64 the requests in flight exceed what one
# worker's pool keeps idle long term: the case the pool must not churn on.
#
# Environment:
#   WORKERS=1  CONNS=100  DURATION=5s  SETTLE=3
#   PROXIES="moonproxy nginx haproxy"
#   BASELINE=PATH  another moonproxy binary (the build before a change): the row
#                  moonproxy-base right after moonproxy, same config, same Lua dir
#   OUT=build/bench-pool-churn.md  NGINX=/usr/sbin/nginx  HAPROXY=/usr/sbin/haproxy  WRK=wrk
# Dependencies: scripts/deps.sh bench.
#
# Every process started here is stopped by PID on exit, and the temp dir goes.
set -Eeuo pipefail
BENCH_NAME=bench_pool_churn
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$BENCH_DIR/lib.sh"
# shellcheck source-path=SCRIPTDIR source=proxies.sh
. "$BENCH_DIR/proxies.sh"
trap 'log "bench_pool_churn: failed at line $LINENO: $BASH_COMMAND"' ERR

ROOT=$(cd "$BENCH_DIR/../.." && pwd)
BIN=${1:-$ROOT/build/moonproxy}
[[ $BIN == /* ]] || BIN=$PWD/$BIN
BASELINE=${BASELINE:-}
if [[ -n $BASELINE ]]; then
    [[ $BASELINE == /* ]] || BASELINE=$PWD/$BASELINE
    export MOONPROXY_LUA_PATH=${MOONPROXY_LUA_PATH:-$ROOT/lua}
fi
WORKERS=${WORKERS:-1}
CONNS=${CONNS:-100}
DURATION=${DURATION:-5s}
SETTLE=${SETTLE:-3}
PROXIES=${PROXIES:-moonproxy nginx haproxy}
if [[ -n $BASELINE && " $PROXIES " == *" moonproxy "* && " $PROXIES " != *" moonproxy-base "* ]]; then
    PROXIES=${PROXIES/moonproxy/moonproxy moonproxy-base}
fi
OUT=${OUT:-$ROOT/build/bench-pool-churn.md}
NGINX=${NGINX:-/usr/sbin/nginx}
HAPROXY=${HAPROXY:-/usr/sbin/haproxy}
WRK=${WRK:-wrk}
T_START=$(date +%s)

bench_tmpdir moonproxy-bench-pool-churn

die() {
    log "bench_pool_churn: $1"
    if [[ -n ${2:-} && -s $2 ]]; then
        log "--- last lines of $2:"
        tail -n 20 "$2" >&2
    fi
    exit 1
}

# backend_active: the backend's "Active connections" (stub_status), the
# query's own connection left out.
backend_active() {
    local fd line n=""
    exec {fd}<>"/dev/tcp/127.0.0.1/$BACKEND_PORT" || die "backend stub_status unreachable"
    printf 'GET /nginx_status HTTP/1.0\r\nHost: backend\r\n\r\n' >&"$fd"
    while IFS= read -r -t 5 line <&"$fd"; do
        line=${line%$'\r'}
        if [[ $line =~ ^Active\ connections:\ *([0-9]+) ]]; then n=${BASH_REMATCH[1]}; fi
    done
    exec {fd}>&-
    [[ -n $n ]] || die "could not read the backend's stub_status"
    echo $((n - 1))
}

declare -A RES=() FAILED=()   # RES[name] = "opened req rps errors held held_later"

run_one() {
    local name=$1 a0 a1 held later req rps err wout=$TMP/wrk-$1.txt
    log "$name: starting"
    a0=$(stub_status "$BACKEND_PORT" 1)
    if ! start_proxy "$name"; then
        FAILED[$name]=$START_ERR
        log "  $name: $START_ERR"
        [[ -n ${PROXY_PID:-} ]] && stop_tree "$PROXY_PID"
        return 0
    fi
    run_wrk "$PROXY_PORT" "$CONNS" "$DURATION" "$wout"
    a1=$(stub_status "$BACKEND_PORT" 1)
    held=$(backend_active)
    sleep "$SETTLE"
    later=$(backend_active)
    stop_tree "$PROXY_PID"
    read -r req rps _ _ _ err < <(parse_wrk "$wout")
    ((req > 0)) || { FAILED[$name]="wrk completed no request: $(tail -n 3 "$wout")"; return 0; }
    # a1 - a0 counts the query that read a0
    RES[$name]="$((a1 - a0 - 1)) $req $rps $err $held $later"
    log "  $name: ${RES[$name]}"
}

report() {
    local name opened req rps err held later hap="" mp=""
    echo "## Upstream pool churn ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "Loopback, $(nproc) CPUs (shared), $WORKERS worker(s) per proxy, wrk -c $CONNS -d $DURATION from the proxy's start;" \
        "upstream keep-alive 64 per worker (moonproxy \`keepalive = 64\`, nginx \`keepalive 64\`, HAProxy \`http-reuse always\`)." \
        "Opened: connections the backend accepted during the run (its stub_status). Held: the backend's open connections right after the run and ${SETTLE} s later."
    echo "Versions: $(versions)."
    echo
    echo "| proxy | upstream conns opened | per 1,000 requests | requests | req/s | errors | held after | held ${SETTLE} s later |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    for name in $PROXIES; do
        if [[ -n ${FAILED[$name]:-} ]]; then
            echo "| $name | did not run: $(oneline "${FAILED[$name]}") | | | | | | |"
            continue
        fi
        [[ -n ${RES[$name]:-} ]] || continue
        read -r opened req rps err held later <<<"${RES[$name]}"
        echo "| $name | $opened | $(awk -v o="$opened" -v r="$req" 'BEGIN { printf "%.2f", 1000 * o / r }') | $req | $rps | $err | $held | $later |"
    done
    echo
    [[ -n ${RES[haproxy]:-} ]] && hap=$(awk '{ print $1 }' <<<"${RES[haproxy]}")
    [[ -n ${RES[moonproxy]:-} ]] && mp=$(awk '{ print $1 }' <<<"${RES[moonproxy]}")
    if [[ -n $hap && -n $mp ]]; then
        echo "- moonproxy opened $mp, HAProxy $hap: $(awk -v m="$mp" -v h="$hap" 'BEGIN { if (h > 0) printf "%.2f×", m / h; else print "– (HAProxy opened none)" }')" \
            "— target ≤ 2×: $(awk -v m="$mp" -v h="$hap" 'BEGIN { print (m <= 2 * h ? "met" : "**missed**") }')."
    else
        echo "- target (moonproxy ≤ 2 × HAProxy): not measured (a proxy did not run)."
    fi
    echo
    echo "Run time: $(($(date +%s) - T_START)) s."
}

main() {
    command -v "$WRK" >/dev/null || die "wrk missing (scripts/deps.sh bench)"
    [[ -x $NGINX ]] || die "$NGINX missing (scripts/deps.sh bench)"
    [[ -x $HAPROXY ]] || die "$HAPROXY missing (scripts/deps.sh bench)"
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    mkdir -p "$(dirname "$OUT")"
    select_proxies
    start_backend
    local name
    for name in $PROXIES; do run_one "$name"; done
    report >"$TMP/report.md"
    cp "$TMP/report.md" "$OUT"
    cat "$TMP/report.md"
    log "written to $OUT"
}

main "$@"
