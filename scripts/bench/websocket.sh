#!/usr/bin/env bash
# scripts/bench/websocket.sh [BIN] — WebSocket tunnels through nginx, HAProxy
# and moonproxy (issue 13, "Speed"), on loopback, plain TCP.
#
# One WebSocket echo origin (scripts/bench/wsecho.c: epoll, RFC 6455
# handshake, frames unmasked and echoed) and one load client
# (scripts/bench/wsload.c: K connections, handshake through the proxy, masked
# binary frames, every echo checked byte for byte), both C, compiled here into
# build/ with cc -O2 (-lcrypto for the SHA-1 of Sec-WebSocket-Accept). Each
# proxy in turn, with WORKERS workers, proxies to the origin:
#   1. throughput: one tunnel, TP_WINDOW messages of TP_SIZE (64 KiB) in flight,
#      for DURATION s: MiB/s echoed, and the proxy's CPU ms per MiB echoed
#      (each echoed MiB crossed the proxy twice: once each way);
#   2. messages: MSG_CONNS (100) tunnels, each with MSG_WINDOW (1) message of
#      MSG_SIZE (32 B) in flight, for DURATION s: messages echoed per second
#      and the proxy's CPU µs per message (round trip);
#   3. idle: IDLE_TUNNELS (1000) tunnels, each after one echo, held idle:
#      the proxy's RSS delta / N (KiB per idle tunnel);
#   4. (TLS=1, the default) 1. again with TLS between client and proxy (the
#      proxy started again with a TLS listener: tls.sh's ECDSA P-256
#      certificate; wsload -T, one full handshake), plain TCP to the origin.
# CPU: utime+stime of the proxy's processes (nginx master + workers) or
# threads over the run, read from /proc (lib.sh's cpu_ticks): the steadiest
# figure on a shared machine. The load client's and origin's CPU are shown so
# that a bottleneck there is visible. A proxy that does not tunnel (moonproxy
# before the tunnel: a 400 to the handshake, or a 101 relayed but no frame
# echoed) gets a "did not run" row with wsload's reason: wsload fails after
# TIMEOUT s without progress, never hangs.
#
# Configurations (written into the temp dir): nginx with proxy_http_version
# 1.1, Upgrade $http_upgrade and Connection "upgrade" set, read/send timeouts
# 300 s, otherwise defaults (proxy_buffer_size, the tunnel's buffer: one page);
# HAProxy mode http, timeout tunnel 300s (default tune.bufsize); moonproxy a
# plain route to the origin (the upgrade is on by default).
#
# Environment: WORKERS=2 DURATION=5 PROXIES="nginx haproxy moonproxy"
#   TP_SIZE=65536 TP_WINDOW=8 MSG_CONNS=100 MSG_SIZE=32 MSG_WINDOW=1
#   IDLE_TUNNELS=1000 (0 = skip) TLS=1 (0 = skip) ECHO_THREADS=1 TIMEOUT=5 ROUNDS=3
#   OUT=build/bench-websocket.md NGINX=/usr/sbin/nginx HAPROXY=/usr/sbin/haproxy CC=cc
# The proxies run side by side (each idle while another is measured); 1. and 2.
# are measured in ROUNDS interleaved rounds (drifting load on the machine hits
# every proxy alike) and the round with the median CPU figure is reported, with
# the CPU range over the rounds; 3. and 4. once per proxy. About 2.5 min.
#
# Every process started here is stopped by PID on exit, and the temp dir goes.
set -Eeuo pipefail
BENCH_NAME=bench_websocket
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$BENCH_DIR/lib.sh"
# shellcheck source-path=SCRIPTDIR source=proxies.sh
. "$BENCH_DIR/proxies.sh"
# tls_certs (its other functions need compare.sh and are not used here)
# shellcheck source-path=SCRIPTDIR source=tls.sh
. "$BENCH_DIR/tls.sh"
trap 'log "bench_websocket: failed at line $LINENO: $BASH_COMMAND"' ERR

ROOT=$(cd "$BENCH_DIR/../.." && pwd)
BIN=${1:-$ROOT/build/moonproxy}
[[ $BIN == /* ]] || BIN=$PWD/$BIN
WORKERS=${WORKERS:-2}
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
PROXIES=${PROXIES:-nginx haproxy moonproxy}
TP_SIZE=${TP_SIZE:-65536}
TP_WINDOW=${TP_WINDOW:-8}
MSG_CONNS=${MSG_CONNS:-100}
MSG_SIZE=${MSG_SIZE:-32}
MSG_WINDOW=${MSG_WINDOW:-1}
IDLE_TUNNELS=${IDLE_TUNNELS:-1000}
TLS=${TLS:-1}
ECHO_THREADS=${ECHO_THREADS:-1}
TIMEOUT=${TIMEOUT:-5}
OUT=${OUT:-$ROOT/build/bench-websocket.md}
NGINX=${NGINX:-/usr/sbin/nginx}
HAPROXY=${HAPROXY:-/usr/sbin/haproxy}
CC=${CC:-cc}
CLK_TCK=$(getconf CLK_TCK)
T_START=$(date +%s)
WSECHO=$ROOT/build/wsecho
WSLOAD=$ROOT/build/wsload

bench_tmpdir moonproxy-bench-ws

die() {
    log "bench_websocket: $1"
    if [[ -n ${2:-} && -s $2 ]]; then
        log "--- last lines of $2:"
        tail -n 20 "$2" >&2
    fi
    exit 1
}

build_tools() {
    mkdir -p "$ROOT/build"
    "$CC" -O2 -Wall -o "$WSECHO" "$BENCH_DIR/wsecho.c" -lcrypto -lpthread 2>"$TMP/cc-wsecho.log" ||
        die "could not compile wsecho.c" "$TMP/cc-wsecho.log"
    "$CC" -O2 -Wall -o "$WSLOAD" "$BENCH_DIR/wsload.c" -lssl -lcrypto 2>"$TMP/cc-wsload.log" ||
        die "could not compile wsload.c" "$TMP/cc-wsload.log"
}

start_origin() {
    ORIGIN_PORT=$(free_port)
    start_bg "$TMP/wsecho.log" "$WSECHO" "$ORIGIN_PORT" "$ECHO_THREADS"
    ORIGIN_PID=$LAST_PID
    wait_port "$ORIGIN_PORT" "$ORIGIN_PID" wsecho || die "$START_ERR" "$TMP/wsecho.log"
    # proxies.sh's write_moonproxy_cfg routes to BACKEND_PORT
    BACKEND_PORT=$ORIGIN_PORT
}

nginx_ws_cfg() { # DIR PORT
    nginx_common "$1"
    cat <<EOF
worker_processes $WORKERS;
events { worker_connections 10240; }
http {
$(nginx_http_common "$1")
    upstream ws { server 127.0.0.1:$ORIGIN_PORT; }
    server {
        listen 127.0.0.1:$2 backlog=4096 reuseport;
        location / {
            proxy_pass http://ws;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
        }
    }
}
EOF
}

# start_one NAME [tls]: PROXY_PID, PROXY_PORT, PROXY_LOG; 1 with START_ERR.
# tls: the listener with TLS (the ECDSA certificate of tls.sh's tls_certs),
# added to the plain configuration as tls.sh does.
start_one() {
    local name=$1 tls=${2:-} dir=$TMP/$1${2:+-tls}
    local crt=$TMP/tls/ecdsa.pem key=$TMP/tls/ecdsa.key
    mkdir -p "$dir"
    PROXY_PORT=$(free_port)
    PROXY_LOG=$dir/stderr.log
    PROXY_PID=
    case $name in
    moonproxy)
        write_moonproxy_cfg "$dir/cfg.lua" "$PROXY_PORT" "$WORKERS"
        if [[ -n $tls ]]; then
            sed -i "s|^proxy.listen { addr = \"127.0.0.1:$PROXY_PORT\" }\$|proxy.listen { addr = \"127.0.0.1:$PROXY_PORT\", tls = { cert = \"$crt\", key = \"$key\" } }|" "$dir/cfg.lua"
            grep -q 'tls = {' "$dir/cfg.lua" || { START_ERR="no listen line to add TLS to"; return 1; }
        fi
        "$BIN" -t -c "$dir/cfg.lua" >"$dir/check.log" 2>&1 || {
            START_ERR="moonproxy -t rejected the config: $(head -c 500 "$dir/check.log")"
            return 1
        }
        start_bg "$PROXY_LOG" "$BIN" -c "$dir/cfg.lua" -w "$WORKERS"
        ;;
    nginx)
        nginx_ws_cfg "$dir" "$PROXY_PORT" >"$dir/nginx.conf"
        if [[ -n $tls ]]; then
            sed -i "s|^\( *listen 127.0.0.1:$PROXY_PORT .*reuseport\);\$|\1 ssl;\n        ssl_certificate $crt;\n        ssl_certificate_key $key;\n        ssl_protocols TLSv1.2 TLSv1.3;|" "$dir/nginx.conf"
            grep -q 'ssl_certificate ' "$dir/nginx.conf" || { START_ERR="no listen line to add TLS to"; return 1; }
        fi
        PROXY_LOG=$dir/error.log
        start_nginx "$dir"
        ;;
    haproxy)
        {
            haproxy_common "$dir" "$WORKERS" "$PROXY_PORT"
            echo "    timeout tunnel 300s"
            echo "    server s1 127.0.0.1:$ORIGIN_PORT"
        } >"$dir/haproxy.cfg"
        if [[ -n $tls ]]; then
            sed -i "s|^\( *bind 127.0.0.1:$PROXY_PORT\)\$|\1 ssl crt $TMP/tls/ecdsa.both.pem alpn http/1.1 ssl-min-ver TLSv1.2|" "$dir/haproxy.cfg"
            grep -q ' ssl crt ' "$dir/haproxy.cfg" || { START_ERR="no bind line to add TLS to"; return 1; }
        fi
        start_bg "$PROXY_LOG" "$HAPROXY" -f "$dir/haproxy.cfg" -db
        ;;
    *) START_ERR="unknown proxy $name"; return 1 ;;
    esac
    PROXY_PID=$LAST_PID
    wait_port "$PROXY_PORT" "$PROXY_PID" "$name" 100
}

# wsload_run OUTFILE ARGS...: wsload against the proxy, in the background (so
# the EXIT trap stops it), waited for; bounded by wsload's own timeouts and,
# for safety, by timeout(1). 0 if it printed "ok".
wsload_run() {
    local outf=$1 pid
    shift
    start_bg "$outf" timeout "$(awk -v d="$DURATION" 'BEGIN { printf "%d", 2 * d + 60 }')" "$WSLOAD" -p "$PROXY_PORT" -t "$TIMEOUT" "$@"
    pid=$LAST_PID
    wait "$pid" || true
    unset "STARTED[$pid]"
    grep -q '^ok ' "$outf"
}

# field FILE NAME: the value of NAME=... in wsload's "ok" line.
field() { awk -v k="$2" '/^ok / { for (i = 2; i <= NF; i++) { split($i, a, "="); if (a[1] == k) print a[2] } }' "$1"; }

# why FILE: wsload's error line (or the end of its output).
why() { oneline "$(grep -m1 '^error:' "$1" || tail -n 2 "$1")"; }

declare -A RES=() FAILED=()
# RES[name:tp] = "mib_per_s cpu_ms_per_mib load_cpu_pct origin_cpu_pct"
# RES[name:msg] = "msgs_per_s cpu_us_per_msg load_cpu_pct origin_cpu_pct"
# RES[name:idle] = "tunnels rss0 rss1 kib_per_tunnel"
# RES[name:tls] = as tp, with TLS from the client

# measure NAME KIND ARGS...: one wsload run, the proxy's and origin's CPU around it.
measure() {
    local name=$1 kind=$2 outf=$TMP/$1-$2.out pids t0 t1 o0 o1 w0 w1 bytes msgs rate mib lcpu
    shift 2
    pids=$(proc_tree "$PROXY_PID")
    # shellcheck disable=SC2086
    t0=$(cpu_ticks $pids) o0=$(cpu_ticks "$ORIGIN_PID") w0=$(date +%s%N)
    if ! wsload_run "$outf" "$@"; then
        FAILED[$name:${kind%%:*}]=$(why "$outf")
        log "  $name $kind: ${FAILED[$name:${kind%%:*}]}"
        return 1
    fi
    # shellcheck disable=SC2086
    t1=$(cpu_ticks $pids) o1=$(cpu_ticks "$ORIGIN_PID") w1=$(date +%s%N)
    bytes=$(field "$outf" bytes) msgs=$(field "$outf" msgs) lcpu=$(field "$outf" cpu_s)
    rate=$(field "$outf" msgs_per_s) mib=$(field "$outf" mib_per_s)
    local common="-v t=$((t1 - t0)) -v o=$((o1 - o0)) -v hz=$CLK_TCK -v w=$((w1 - w0)) -v l=$lcpu"
    if [[ ${kind%%:*} == tp || $kind == tls ]]; then
        # shellcheck disable=SC2086
        RES[$name:$kind]=$(awk $common -v b="$bytes" -v m="$mib" 'BEGIN {
            printf "%s %.2f %.0f %.0f", m, 1000 * t / hz / (b / 1048576), 100 * l / (w / 1e9), 100 * o / hz / (w / 1e9) }')
    else
        # shellcheck disable=SC2086
        RES[$name:$kind]=$(awk $common -v n="$msgs" -v r="$rate" 'BEGIN {
            printf "%s %.2f %.0f %.0f", r, 1e6 * t / hz / n, 100 * l / (w / 1e9), 100 * o / hz / (w / 1e9) }')
    fi
    log "  $name $kind: ${RES[$name:$kind]} ($(head -n 1 "$outf"))"
}

# idle_tunnels NAME: RSS of the proxy before and while it holds IDLE_TUNNELS idle tunnels.
idle_tunnels() {
    local name=$1 pids r0 r1 outf=$TMP/$1-idle.out stopf=$TMP/$1-idle.stop pid i opened=""
    ((IDLE_TUNNELS > 0)) || return 0
    pids=$(proc_tree "$PROXY_PID")
    # shellcheck disable=SC2086
    r0=$(rss_kib $pids)
    : >"$outf"
    start_bg "$outf" timeout 200 "$WSLOAD" -p "$PROXY_PORT" -t "$TIMEOUT" -i -c "$IDLE_TUNNELS" -s "$MSG_SIZE" -f "$stopf" -H 120
    pid=$LAST_PID
    for ((i = 0; i < 1000; i++)); do   # <= 100 s; wsload's handshake deadline is shorter
        opened=$(awk '/^opened/ { print $2 }' "$outf")
        [[ -n $opened ]] && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if [[ -z $opened ]]; then
        stop_tree "$pid"
        FAILED[$name:idle]=$(why "$outf")
        log "  $name idle: ${FAILED[$name:idle]}"
        return 0
    fi
    sleep 1   # let lazily-freed buffers settle
    # shellcheck disable=SC2086
    r1=$(rss_kib $pids)
    : >"$stopf"
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    stop_tree "$pid"
    if grep -q '^closed_by_peer [1-9]' "$outf"; then
        FAILED[$name:idle]="the proxy closed idle tunnels: $(grep '^closed_by_peer' "$outf")"
        log "  $name idle: ${FAILED[$name:idle]}"
        return 0
    fi
    RES[$name:idle]=$(awk -v a="$r0" -v b="$r1" -v n="$opened" 'BEGIN { printf "%d %d %d %.2f", n, a, b, (b - a) / n }')
    log "  $name idle: ${RES[$name:idle]} (tunnels, RSS KiB before, while held, KiB per tunnel)"
}

declare -A PID_OF=() PORT_OF=()

# start_all: every proxy at once (idle while another is measured), each
# probed with one short tunnel; a proxy that does not tunnel gets FAILED[name]
# (in TIMEOUT s at most) and is stopped.
start_all() {
    local name
    for name in $PROXIES; do
        [[ -z ${FAILED[$name]:-} ]] || continue   # not built / skipped
        log "$name: starting"
        if ! start_one "$name"; then
            FAILED[$name]=$START_ERR
            [[ -s ${PROXY_LOG:-} ]] && FAILED[$name]+=": $(tail -n 2 "$PROXY_LOG")"
            log "  $name: ${FAILED[$name]}"
            [[ -n ${PROXY_PID:-} ]] && stop_tree "$PROXY_PID"
            continue
        fi
        if ! wsload_run "$TMP/$name-probe.out" -c 1 -s 125 -d 0.2; then
            FAILED[$name]="no tunnel: $(why "$TMP/$name-probe.out")"
            log "  $name: ${FAILED[$name]}"
            stop_tree "$PROXY_PID"
            continue
        fi
        PID_OF[$name]=$PROXY_PID PORT_OF[$name]=$PROXY_PORT
    done
}

use() { PROXY_PID=${PID_OF[$1]} PROXY_PORT=${PORT_OF[$1]}; }

# median NAME KIND: of the rounds that ran, the one with the median CPU figure
# becomes RES[NAME:KIND], with the CPU range over the rounds appended.
median() {
    local r rows=""
    for ((r = 1; r <= ROUNDS; r++)); do
        [[ -n ${RES[$1:$2:$r]:-} ]] && rows+="${RES[$1:$2:$r]}"$'\n'
    done
    [[ -n $rows ]] || return 0
    RES[$1:$2]=$(sort -g -k2,2 <<<"${rows%$'\n'}" | awk '{ row[NR] = $0; cpu[NR] = $2 }
        END { print row[int((NR + 1) / 2)], cpu[1], cpu[NR] }')
}

# rounds: ROUNDS rounds, each running the throughput and the message run on
# every proxy in turn, so that load drifting on the machine hits them alike.
rounds() {
    local r name
    for ((r = 1; r <= ROUNDS; r++)); do
        log "round $r of $ROUNDS"
        for name in $PROXIES; do
            [[ -n ${PID_OF[$name]:-} ]] || continue
            use "$name"
            measure "$name" "tp:$r" -c 1 -s "$TP_SIZE" -w "$TP_WINDOW" -d "$DURATION" || true
            measure "$name" "msg:$r" -c "$MSG_CONNS" -s "$MSG_SIZE" -w "$MSG_WINDOW" -d "$DURATION" || true
        done
    done
    for name in $PROXIES; do
        median "$name" tp
        median "$name" msg
    done
}

# ws_versions: nginx, HAProxy, moonproxy on one line.
ws_versions() {
    local n h
    n=$("$NGINX" -v 2>&1 || true)
    h=$("$HAPROXY" -v 2>/dev/null || true)
    h=${h%%$'\n'*}
    printf '%s, %s%s' "${n##*: }" "$(awk '{ print $1, $3 }' <<<"$h")" "${MP_VERSION:+, $MP_VERSION}"
}

# run_tls NAME: the throughput run again with a TLS listener.
run_tls() {
    local name=$1
    ((TLS)) || return 0
    [[ -z ${FAILED[$name]:-} ]] || return 0
    log "$name (TLS): starting"
    if ! start_one "$name" tls; then
        FAILED[$name:tls]=$START_ERR
        [[ -s ${PROXY_LOG:-} ]] && FAILED[$name:tls]+=": $(tail -n 2 "$PROXY_LOG")"
        log "  $name tls: $START_ERR"
        [[ -n ${PROXY_PID:-} ]] && stop_tree "$PROXY_PID"
        return 0
    fi
    if wsload_run "$TMP/$name-tls-probe.out" -T -c 1 -s 125 -d 0.2; then
        measure "$name" tls -T -c 1 -s "$TP_SIZE" -w "$TP_WINDOW" -d "$DURATION" || true
    else
        FAILED[$name:tls]="no tunnel: $(why "$TMP/$name-tls-probe.out")"
        log "  $name tls: ${FAILED[$name:tls]}"
    fi
    stop_tree "$PROXY_PID"
}

# cell NAME KIND FIELD: one figure, or "" if that part did not run.
cell() {
    local v=${RES[$1:$2]:-}
    [[ -n $v ]] || return 0
    awk -v i="$3" '{ print $i }' <<<"$v"
}

# cpu_cell NAME KIND: the median round's CPU figure, and the range over the rounds.
cpu_cell() {
    local v
    v=$(cell "$1" "$2" 2)
    ((ROUNDS > 1)) && v+=" ($(cell "$1" "$2" 5)–$(cell "$1" "$2" 6))"
    printf '%s' "$v"
}

# ratios LABEL KIND FIELD: moonproxy ÷ nginx and ÷ haproxy of one figure.
ratios() {
    local m n h
    m=$(cell moonproxy "$2" "$3") n=$(cell nginx "$2" "$3") h=$(cell haproxy "$2" "$3")
    echo "- $1: moonproxy ÷ nginx **$(ratio "$m" "$n")**, moonproxy ÷ HAProxy **$(ratio "$m" "$h")**"
}

report() {
    local name kind
    echo "## WebSocket tunnels ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "Loopback, plain TCP, $(nproc) CPUs (shared, noisy: compare rows of one run), $WORKERS workers per proxy;" \
        "origin: build/wsecho ($ECHO_THREADS thread(s)), client: build/wsload; each load run $DURATION s;" \
        "throughput and messages: the median of $ROUNDS interleaved rounds by CPU (the CPU range over the rounds in brackets)."
    echo "Versions: $(ws_versions)."
    echo "Load average (1 min) at start: $LOAD0, at end: $(cut -d' ' -f1 /proc/loadavg)."
    echo "CPU: the proxy's utime+stime (all its processes/threads) over the run, per MiB of payload echoed (each MiB crossed the proxy both ways) or per message echoed; client / origin CPU: their share of one CPU during the run."
    echo
    echo "| proxy | 1 tunnel × $TP_SIZE B (window $TP_WINDOW): MiB/s | CPU ms/MiB | client / origin CPU |" \
        "$MSG_CONNS tunnels × $MSG_SIZE B: msg/s | CPU µs/msg | client / origin CPU | idle: KiB/tunnel ($IDLE_TUNNELS) |" \
        "TLS client, 1 tunnel: MiB/s | CPU ms/MiB |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for name in $PROXIES; do
        if [[ -n ${FAILED[$name]:-} ]]; then
            echo "| $name | did not run: $(oneline "${FAILED[$name]}") | | | | | | | | |"
            continue
        fi
        local row="| $name"
        for kind in tp msg; do
            if [[ -n ${RES[$name:$kind]:-} ]]; then
                row+=" | $(cell "$name" $kind 1) | $(cpu_cell "$name" $kind) | $(cell "$name" $kind 3)% / $(cell "$name" $kind 4)%"
                [[ -n ${FAILED[$name:$kind]:-} ]] && row+=" (a round failed: $(oneline "${FAILED[$name:$kind]}"))"
            else
                row+=" | failed: $(oneline "${FAILED[$name:$kind]:-not measured}") | | "
            fi
        done
        if [[ -n ${RES[$name:idle]:-} ]]; then
            row+=" | $(cell "$name" idle 4)"
        elif ((IDLE_TUNNELS > 0)); then
            row+=" | failed: $(oneline "${FAILED[$name:idle]:-not measured}")"
        else
            row+=" | –"
        fi
        if [[ -n ${RES[$name:tls]:-} ]]; then
            row+=" | $(cell "$name" tls 1) | $(cell "$name" tls 2)"
        elif ((TLS)); then
            row+=" | failed: $(oneline "${FAILED[$name:tls]:-not measured}") | "
        else
            row+=" | – | –"
        fi
        echo "$row |"
    done
    echo
    ratios "throughput (MiB/s, higher is better)" tp 1
    ratios "CPU per MiB (lower is better; target ≤ nginx)" tp 2
    ratios "messages per second (higher is better)" msg 1
    ratios "CPU per message (lower is better)" msg 2
    ratios "RSS per idle tunnel (lower is better; target ≤ nginx)" idle 4
    if ((TLS)); then
        ratios "TLS client: throughput (MiB/s)" tls 1
        ratios "TLS client: CPU per MiB" tls 2
    fi
    echo
    echo "Run time: $(($(date +%s) - T_START)) s."
}

main() {
    [[ -x $NGINX ]] || die "$NGINX missing (scripts/deps.sh bench)"
    [[ -x $HAPROXY ]] || die "$HAPROXY missing (scripts/deps.sh bench)"
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    mkdir -p "$(dirname "$OUT")"
    LOAD0=$(cut -d' ' -f1 /proc/loadavg)
    build_tools
    # select_proxies drops a moonproxy that is not built (and sets MP_VERSION):
    # keep its row, saying why it did not run
    local all=$PROXIES p
    select_proxies
    for p in $all; do
        [[ " $PROXIES " == *" $p "* ]] || FAILED[$p]="skipped: $BIN not built, or SKIP_MOONPROXY=1"
    done
    PROXIES=$all
    ((TLS)) && tls_certs
    start_origin
    start_all
    rounds
    local name
    for name in $PROXIES; do
        [[ -n ${PID_OF[$name]:-} ]] || continue
        use "$name"
        idle_tunnels "$name"
        stop_tree "$PROXY_PID"
    done
    for name in $PROXIES; do run_tls "$name"; done
    report >"$TMP/report.md"
    cp "$TMP/report.md" "$OUT"
    cat "$TMP/report.md"
    log "written to $OUT"
}

main "$@"
