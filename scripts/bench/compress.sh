#!/usr/bin/env bash
# scripts/bench/compress.sh [BIN] — gzip of a 64 KiB text response, moonproxy
# against nginx, level for level (issue 14 "Speed").
#
# One nginx backend serves a 64 KiB text/plain file (identity). In front of it,
# in turn, with the same worker count and keep-alive both ways:
#
#   nginx      proxy_pass, gzip on; gzip_comp_level LEVEL; gzip_types text/plain
#   moonproxy  compress = { algorithms = { "gzip" }, level = LEVEL }
#
# each driven by wrk (-t THREADS -c CONNS -d DURATION, Accept-Encoding: gzip)
# for every LEVEL in LEVELS. A row: requests/s, MiB/s the client received
# (compressed), the proxy's CPU time per request (utime+stime of every process
# of the proxy over the run, divided by the requests) and the compressed size.
# The backend alone (identity) is the first row: the one-hop floor.
#
# Environment: WORKERS=1  CONNS=100  THREADS=2  DURATION=10s  WARMUP=2s
#   LEVELS="1 6"  OUT=build/bench-compress.md  NGINX=/usr/sbin/nginx  WRK=wrk
# The machine must be otherwise idle for the figures to mean anything.
# Every process started here is stopped by PID on exit, and the temp dir goes.
set -Eeuo pipefail
BENCH_NAME=bench_compress
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
trap 'log "bench_compress: failed at line $LINENO: $BASH_COMMAND"' ERR

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${1:-$ROOT/build/moonproxy}
[[ $BIN == /* ]] || BIN=$PWD/$BIN
WORKERS=${WORKERS:-1}
CONNS=${CONNS:-100}
THREADS=${THREADS:-2}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
LEVELS=${LEVELS:-1 6}
OUT=${OUT:-$ROOT/build/bench-compress.md}
NGINX=${NGINX:-/usr/sbin/nginx}
WRK=${WRK:-wrk}
CLK_TCK=$(getconf CLK_TCK)

bench_tmpdir moonproxy-bench-compress

die() {
    log "bench_compress: $1"
    if [[ -n ${2:-} && -s $2 ]]; then
        log "--- last lines of $2:"
        tail -n 20 "$2" >&2
    fi
    exit 1
}

[[ -x $BIN ]] || die "no moonproxy binary at $BIN (make all)"
command -v "$WRK" >/dev/null || die "wrk not found (scripts/deps.sh bench)"

# The 64 KiB text: lines of words, compressible about as well as HTML.
mkdir -p "$TMP/www"
awk 'BEGIN { srand(1); n = 0
    split("the proxy streams every response body through one buffer per connection with back pressure", w, " ")
    while (n < 65536) { line = ""; for (i = 0; i < 12; i++) line = line w[int(rand() * 14) + 1] " "
        line = line int(rand() * 100000) "\n"; printf "%s", line; n += length(line) } }' >"$TMP/www/page.txt"
truncate -s 65536 "$TMP/www/page.txt"

BPORT=$(free_port)
mkdir -p "$TMP/backend"
{
    nginx_common "$TMP/backend"
    cat <<EOF
worker_processes 1;
events { worker_connections 10240; }
http {
$(nginx_http_common "$TMP/backend")
    default_type text/plain;
    server { listen 127.0.0.1:$BPORT; root $TMP/www; location / { } }
}
EOF
} >"$TMP/backend/nginx.conf"
start_nginx "$TMP/backend"
BACKEND_PID=$LAST_PID
wait_port "$BPORT" "$BACKEND_PID" "backend nginx" || die "$START_ERR" "$TMP/backend/error.log"

# run PORT NAME LEVEL: warm-up, then the measured run of the proxy CUR_PID
# (and its children); prints the table row.
run() {
    local port=$1 name=$2 level=$3 t0 t1 req rps mib size
    local -a pids
    "$WRK" -t "$THREADS" -c "$CONNS" -d "$WARMUP" -H "Accept-Encoding: gzip" "http://127.0.0.1:$port/page.txt" \
        >/dev/null 2>&1 || true
    read -ra pids <<<"$(proc_tree "$CUR_PID" | tr '\n' ' ')"
    t0=$(cpu_ticks "${pids[@]}")
    "$WRK" -t "$THREADS" -c "$CONNS" -d "$DURATION" --latency -H "Accept-Encoding: gzip" \
        "http://127.0.0.1:$port/page.txt" >"$TMP/wrk.out" 2>&1 || die "wrk failed" "$TMP/wrk.out"
    t1=$(cpu_ticks "${pids[@]}")
    read -r req rps _ _ _ _ <<<"$(parse_wrk "$TMP/wrk.out")"
    mib=$(awk '/^Transfer\/sec:/ { v = $2 + 0; u = $2; sub(/^[0-9.]+/, "", u)
        if (u == "KB") v /= 1024; if (u == "GB") v *= 1024; if (u == "B") v /= 1048576; printf "%.1f", v }' "$TMP/wrk.out")
    size=$(curl -s -H "Accept-Encoding: gzip" "http://127.0.0.1:$port/page.txt" | wc -c)
    awk -v n="$name" -v l="$level" -v r="$rps" -v m="$mib" -v t=$((t1 - t0)) -v q="$req" -v hz="$CLK_TCK" -v s="$size" \
        'BEGIN { printf "| %s | %s | %d | %s | %.1f | %d |\n", n, l, r, m, q ? t / hz / q * 1e6 : 0, s }'
}

# nginx_gzip_conf DIR PORT LEVEL: nginx as a gzip-ing reverse proxy to the backend.
nginx_gzip_conf() {
    nginx_common "$1"
    cat <<EOF
worker_processes $WORKERS;
events { worker_connections 10240; }
http {
$(nginx_http_common "$1")
    upstream b { server 127.0.0.1:$BPORT; keepalive 64; }
    server {
        listen 127.0.0.1:$2;
        gzip on; gzip_comp_level $3; gzip_types text/plain; gzip_min_length 256; gzip_proxied any;
        location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; }
    }
}
EOF
}

# mp_conf PORT LEVEL: moonproxy with the same.
mp_conf() {
    cat <<EOF
local proxy = require "moonproxy"
proxy.listen { addr = "127.0.0.1:$1" }
proxy.settings { access_log = false, workers = $WORKERS, max_connections = 20000 }
local b = proxy.upstream "b" { servers = { "127.0.0.1:$BPORT" }, keepalive = 64 }
proxy.route { prefix = "/", upstream = b, compress = { algorithms = { "gzip" }, level = $2, types = { "text/plain" } } }
EOF
}

{
    echo "gzip of a 64 KiB text/plain response: $CONNS connections, $THREADS wrk threads, $DURATION, $WORKERS proxy worker(s); $(nproc) CPUs, $(date -u +%F)"
    echo
    echo "| server | level | req/s | MiB/s (compressed) | CPU µs/request | body bytes |"
    echo "|---|---|---|---|---|---|"
    CUR_PID=$BACKEND_PID
    run "$BPORT" "backend alone (identity)" "-"
    for level in $LEVELS; do
        port=$(free_port)
        d="$TMP/nginx-$level"
        mkdir -p "$d"
        nginx_gzip_conf "$d" "$port" "$level" >"$d/nginx.conf"
        start_nginx "$d"
        CUR_PID=$LAST_PID
        wait_port "$port" "$CUR_PID" "nginx proxy" || die "$START_ERR" "$d/error.log"
        run "$port" "nginx" "$level"
        stop_tree "$CUR_PID"

        port=$(free_port)
        mp_conf "$port" "$level" >"$TMP/mp-$level.lua"
        start_bg "$TMP/mp-$level.log" env MOONPROXY_LUA_PATH="$ROOT/lua" "$BIN" -c "$TMP/mp-$level.lua"
        CUR_PID=$LAST_PID
        wait_port "$port" "$CUR_PID" "moonproxy" || die "$START_ERR" "$TMP/mp-$level.log"
        run "$port" "moonproxy" "$level"
        stop_tree "$CUR_PID"
    done
} | tee "$OUT"
log "bench_compress: table in $OUT"
