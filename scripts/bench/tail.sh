#!/usr/bin/env bash
# scripts/bench/tail.sh [BIN] — tail latency when one of three servers is slow.
#
# Backends: one nginx (with lua-nginx-module) serving three ports: two answer
# "hello\n" at once, the third waits SLOW_MS (default 50 ms, ngx.sleep) before
# the same answer. Every proxy gets all three in one upstream with keep-alive,
# the same worker count, and is driven in turn by a closed-loop wrk
# (-t THREADS -c CONNS -d DURATION --latency; Debian's wrk has no -R):
#
#   moonproxy  balancer = round_robin, least_conn, p2c, ewma (the C paths)
#   moonproxy  settings.lua_balancers = true with p2c and ewma (the Lua
#              modules in lua/moonproxy/balancer/ instead of the C paths)
#   nginx      least_conn (with a shared zone: counts over all workers, as
#              moonproxy's), upstream keepalive 64, reuseport
#   HAProxy    balance leastconn, http-reuse always
#
# For each: req/s, p50/p90/p99 (wrk), the share of requests the slow server
# answered (its own access log, one byte pair per request, over the backend's
# stub_status request count), the proxy's CPU µs/request (utime+stime of all
# its processes/threads from /proc over requests completed) and the backend's
# CPU use (to show it was not the bottleneck).
#
# Then the Lua-vs-C pick cost: the four p2c/ewma configurations (C and Lua)
# run at once and are driven in interleaved rounds (PICK_ROUNDS of
# PICK_DURATION, order rotating), so drifting load on a shared machine hits
# them alike; CPU µs/request is pooled over the rounds and the per-round
# ratios show the noise. Target: Lua ≤ 1.05 × C.
#
# Output: Markdown on stdout and in build/bench-tail.md. About 3 minutes.
#
# Environment:
#   WORKERS=2  CONNS=50  THREADS=2  DURATION=10s  WARMUP=1s  SLOW_MS=50
#   CONFIGS="mp-round_robin mp-least_conn mp-p2c mp-ewma mp-lua-p2c mp-lua-ewma nginx haproxy"
#           (also available: nginx-rr, haproxy-rr: their round robin, for
#           reference against mp-round_robin)
#   PICK_ROUNDS=3  PICK_DURATION=5s   (PICK_ROUNDS=0 skips the interleaved part)
#   CALLGRIND=1  instead of all that, the exact Lua-vs-C figure: the four
#                p2c/ewma configurations, 1 worker each, under callgrind;
#                instructions per request and per pick; CG_DURATION=5s;
#                to build/bench-tail-callgrind.md. About 1.5 minutes.
#   OUT=build/bench-tail.md  NGINX=/usr/sbin/nginx  HAPROXY=/usr/sbin/haproxy  WRK=wrk
#
# Every process started here is stopped by PID on exit, and the temp dir goes.
set -Eeuo pipefail
BENCH_NAME=bench_tail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
ONELINE_MAX=400
trap 'log "bench_tail: failed at line $LINENO: $BASH_COMMAND"' ERR

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${1:-$ROOT/build/moonproxy}
[[ $BIN == /* ]] || BIN=$PWD/$BIN

WORKERS=${WORKERS:-2}
CONNS=${CONNS:-50}
THREADS=${THREADS:-2}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-1s}
SLOW_MS=${SLOW_MS:-50}
CONFIGS=${CONFIGS:-mp-round_robin mp-least_conn mp-p2c mp-ewma mp-lua-p2c mp-lua-ewma nginx haproxy}
PICK_ROUNDS=${PICK_ROUNDS:-3}
PICK_DURATION=${PICK_DURATION:-5s}
PICK_CONFIGS="mp-p2c mp-lua-p2c mp-ewma mp-lua-ewma"
CALLGRIND=${CALLGRIND:-0}
CG_DURATION=${CG_DURATION:-5s}
if [[ $CALLGRIND == 1 ]]; then OUT=${OUT:-$ROOT/build/bench-tail-callgrind.md}; else OUT=${OUT:-$ROOT/build/bench-tail.md}; fi
NGINX=${NGINX:-/usr/sbin/nginx}
HAPROXY=${HAPROXY:-/usr/sbin/haproxy}
WRK=${WRK:-wrk}
CLK_TCK=$(getconf CLK_TCK)
T_START=$(date +%s)
SETTLE=$(awk -v m="$SLOW_MS" 'BEGIN { printf "%.3f", (m + 50) / 1000 }')

bench_tmpdir moonproxy-bench-tail

die() {
    log "bench_tail: $1"
    if [[ -n ${2:-} && -s $2 ]]; then
        log "--- last lines of $2:"
        tail -n 20 "$2" >&2
    fi
    exit 1
}

# ---------------------------------------------------------------------------
# Measurements (user_ticks, cpu_ticks: scripts/bench/lib.sh).

# backend_requests: the backend's stub_status "requests" (all three servers;
# the query itself counts one).
backend_requests() { stub_status "${BPORT[0]}" 3; }

# slow_requests: requests the slow server answered (2 bytes per log line).
slow_requests() {
    local s
    s=$(stat -c %s "$TMP/backend/slow.log" 2>/dev/null || echo 0)
    echo $((s / 2))
}

# run_wrk PORT DURATION OUTFILE
run_wrk() {
    "$WRK" -t "$THREADS" -c "$CONNS" -d "$2" --latency "http://127.0.0.1:$1/" >"$3" 2>&1 ||
        die "wrk failed against 127.0.0.1:$1" "$3"
}

# ---------------------------------------------------------------------------
# Servers (nginx_common, nginx_http_common, nginx_lua_modules:
# scripts/bench/lib.sh).

# The backend: BPORT[0], BPORT[1] fast, BPORT[2] slow. Two workers with
# reuseport on every port, so the load spreads over both.
declare -a BPORT=()
start_backend() {
    local dir=$TMP/backend mods
    mkdir -p "$dir"
    BPORT=("$(free_port)" "$(free_port)" "$(free_port)")
    mods=$(nginx_lua_modules) || die "ngx_http_lua_module.so not found (apt-get install libnginx-mod-http-lua)"
    {
        echo "$mods"
        nginx_common "$dir"
        cat <<EOF
worker_processes 2;
events { worker_connections 8192; }
http {
$(nginx_http_common "$dir")
    log_format one "s";
    server {
        listen 127.0.0.1:${BPORT[0]} backlog=4096 reuseport;
        location / { return 200 "hello\n"; }
        location = /nginx_status { stub_status; }
    }
    server {
        listen 127.0.0.1:${BPORT[1]} backlog=4096 reuseport;
        location / { return 200 "hello\n"; }
    }
    server {
        listen 127.0.0.1:${BPORT[2]} backlog=4096 reuseport;
        location / {
            access_log $dir/slow.log one;
            content_by_lua_block {
                ngx.sleep($(awk -v m="$SLOW_MS" 'BEGIN { printf "%.3f", m / 1000 }'))
                ngx.header.content_type = "text/plain"
                ngx.header.content_length = 6
                ngx.print("hello\n")
            }
        }
    }
}
EOF
    } >"$dir/nginx.conf"
    start_nginx "$dir"
    BACKEND_PID=$LAST_PID
    local p
    for p in "${BPORT[@]}"; do
        wait_port "$p" "$BACKEND_PID" "backend nginx" || die "$START_ERR" "$dir/error.log"
    done
    # The slow server must really be slow, the fast ones fast.
    local t
    t=$(curl -s -o /dev/null -w '%{time_total}' "http://127.0.0.1:${BPORT[2]}/") || die "slow backend does not answer" "$dir/error.log"
    awk -v t="$t" -v m="$SLOW_MS" 'BEGIN { exit !(t * 1000 >= m * 0.9) }' || die "slow backend answered in ${t}s"
    curl -sf -o /dev/null "http://127.0.0.1:${BPORT[0]}/" || die "fast backend does not answer" "$dir/error.log"
    : >"$dir/slow.log"      # does not count the check (nginx keeps the fd, O_APPEND)
}

# start_proxy NAME: sets PROXY_PID, PROXY_PORT; returns 1 with START_ERR set.
# The callgrind mode sets PROXY_WRAP (valgrind ...), PROXY_WORKERS (1) and
# PROXY_WAIT (start-up limit in tenths of a second); moonproxy only.
PROXY_WRAP=()
start_proxy() {
    local name=$1 dir=$TMP/$1
    mkdir -p "$dir"
    PROXY_PORT=$(free_port)
    PROXY_PID=
    case $name in
    mp-*)
        local bal=${name#mp-} lua=false
        if [[ $bal == lua-* ]]; then bal=${bal#lua-} lua=true; fi
        cat >"$dir/cfg.lua" <<EOF
local proxy = require "moonproxy"
proxy.listen { addr = "127.0.0.1:$PROXY_PORT" }
proxy.settings { workers = ${PROXY_WORKERS:-$WORKERS}, access_log = false, shutdown_timeout = 2, lua_balancers = $lua }
local b = proxy.upstream "b" {
  servers = { "127.0.0.1:${BPORT[0]}", "127.0.0.1:${BPORT[1]}", "127.0.0.1:${BPORT[2]}" },
  balancer = "$bal",
  keepalive = 64,
}
proxy.route { prefix = "/", upstream = b }
EOF
        "$BIN" -t -c "$dir/cfg.lua" >"$dir/check.log" 2>&1 || {
            START_ERR="moonproxy -t rejected the config: $(head -c 500 "$dir/check.log")"
            return 1
        }
        start_bg "$dir/stderr.log" "${PROXY_WRAP[@]}" "$BIN" -c "$dir/cfg.lua" -w "${PROXY_WORKERS:-$WORKERS}"
        PROXY_LOGF=$dir/stderr.log
        ;;
    nginx | nginx-rr)
        local lc="least_conn;"
        [[ $name == nginx-rr ]] && lc=""
        {
            nginx_common "$dir"
            nginx_proxy_http "$dir" "$WORKERS" "$PROXY_PORT" "        zone b 64k;
        $lc
        server 127.0.0.1:${BPORT[0]};
        server 127.0.0.1:${BPORT[1]};
        server 127.0.0.1:${BPORT[2]};"
        } >"$dir/nginx.conf"
        start_nginx "$dir"
        PROXY_LOGF=$dir/error.log
        ;;
    haproxy | haproxy-rr)
        local hb=leastconn
        [[ $name == haproxy-rr ]] && hb=roundrobin
        {
            haproxy_common "$dir" "$WORKERS" "$PROXY_PORT"
            cat <<EOF
    balance $hb
    server s1 127.0.0.1:${BPORT[0]}
    server s2 127.0.0.1:${BPORT[1]}
    server s3 127.0.0.1:${BPORT[2]}
EOF
        } >"$dir/haproxy.cfg"
        start_bg "$dir/stderr.log" "$HAPROXY" -f "$dir/haproxy.cfg" -db
        PROXY_LOGF=$dir/stderr.log
        ;;
    *) die "unknown configuration $name" ;;
    esac
    PROXY_PID=$LAST_PID
    wait_port "$PROXY_PORT" "$PROXY_PID" "$name" "${PROXY_WAIT:-100}" || {
        START_ERR="$START_ERR: $(tail -n 5 "$PROXY_LOGF" 2>/dev/null)"
        return 1
    }
    # One request through it, before measuring: a proxy that answers wrongly
    # would otherwise show up as fast errors.
    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 30 "http://127.0.0.1:$PROXY_PORT/" || true)
    [[ $code == 200 ]] || { START_ERR="$name answered $code to a first request: $(tail -n 5 "$PROXY_LOGF" 2>/dev/null)"; return 1; }
}

declare -A LABEL=(
    [mp-round_robin]="moonproxy|round_robin (C)"
    [mp-least_conn]="moonproxy|least_conn (C)"
    [mp-p2c]="moonproxy|p2c (C)"
    [mp-ewma]="moonproxy|ewma (C)"
    [mp-lua-p2c]="moonproxy|p2c (Lua module)"
    [mp-lua-ewma]="moonproxy|ewma (Lua module)"
    [nginx]="nginx|least_conn"
    [haproxy]="haproxy|leastconn"
    [nginx-rr]="nginx|round robin (default)"
    [haproxy-rr]="haproxy|roundrobin"
)

# ---------------------------------------------------------------------------
# Part 1: each configuration alone.

declare -A RES=()     # RES[name] = "req rps p50 p90 p99 err cpu_us slow_share_% backend_cpu_%"
declare -A FAILED=()

# measure NAME DURATION WOUT -> "req rps p50 p90 p99 err ticks slow total
# backend_ticks user_ticks"
# against the running proxy (PROXY_PID, PROXY_PORT).
measure() {
    local pids t0 t1 u0 u1 s0 s1 b0 b1 bt0 bt1 bp
    pids=$(proc_tree "$PROXY_PID")
    bp=$(proc_tree "$BACKEND_PID")
    s0=$(slow_requests) b0=$(backend_requests)
    # shellcheck disable=SC2086
    t0=$(cpu_ticks $pids) bt0=$(cpu_ticks $bp) u0=$(user_ticks $pids)
    run_wrk "$PROXY_PORT" "$2" "$3"
    # shellcheck disable=SC2086
    t1=$(cpu_ticks $pids) bt1=$(cpu_ticks $bp) u1=$(user_ticks $pids)
    sleep "$SETTLE"        # slow answers still in flight land in the log
    s1=$(slow_requests) b1=$(backend_requests)
    echo "$(parse_wrk "$3") $((t1 - t0)) $((s1 - s0)) $((b1 - b0 - 1)) $((bt1 - bt0)) $((u1 - u0))"
}

run_one() {
    local name=$1 wout=$TMP/wrk-$1.txt req rps p50 p90 p99 err ticks slow total bticks uticks secs
    log "$name: starting"
    if ! start_proxy "$name"; then
        FAILED[$name]=$START_ERR
        log "  $name: $START_ERR"
        [[ -n ${PROXY_PID:-} ]] && stop_tree "$PROXY_PID"
        return 0
    fi
    run_wrk "$PROXY_PORT" "$WARMUP" "$wout"
    read -r req rps p50 p90 p99 err ticks slow total bticks uticks < <(measure "$name" "$DURATION" "$wout")
    stop_tree "$PROXY_PID"
    note_log "$name"
    ((req > 0)) || { FAILED[$name]="wrk completed no request: $(tail -n 3 "$wout")"; return 0; }
    secs=${DURATION%s}
    RES[$name]=$(awk -v req="$req" -v rps="$rps" -v p50="$p50" -v p90="$p90" -v p99="$p99" -v err="$err" \
        -v t="$ticks" -v hz="$CLK_TCK" -v slow="$slow" -v total="$total" -v bt="$bticks" -v secs="$secs" -v ut="$uticks" 'BEGIN {
        printf "%d %d %d %d %d %d %.2f %.2f %.0f %d %d %.2f", req, rps, p50, p90, p99, err, t * 1e6 / hz / req,
            (total > 0 ? 100 * slow / total : 0), 100 * bt / hz / secs, slow, total, ut * 1e6 / hz / req }')
    log "  $name: ${RES[$name]}"
}

# note_log NAME [PREFIX]: moonproxy's warn/error log lines during a run (there
# should be none) go to the report, at most 5 per configuration.
declare -a LOGNOTES=()
note_log() {
    local logf=$TMP/$1/stderr.log n lines
    [[ $1 == mp-* && -s $logf ]] || return 0
    n=$(grep -c ' \[\(warn\|error\)\] ' "$logf" || true)
    ((n > 0)) || return 0
    lines=$(awk '/ \[(warn|error)\] / && k++ < 5 { printf "%s ", $0 }' "$logf")
    LOGNOTES+=("${2:-}$1: $n warn/error line(s), first: $lines")
}

# ---------------------------------------------------------------------------
# Part 2: Lua vs C pick, interleaved.

declare -A PPORT=() PPID_=() PREQ=() PTICK=() PUTICK=() PROUND=()
pick_bench() {
    local name r i k wout req rps p50 p90 p99 err ticks slow total bticks uticks
    local -a order
    for name in $PICK_CONFIGS; do
        if ! start_proxy "$name"; then
            FAILED[pick:$name]=$START_ERR
            log "  pick $name: $START_ERR"
            [[ -n ${PROXY_PID:-} ]] && stop_tree "$PROXY_PID"
            continue
        fi
        PPORT[$name]=$PROXY_PORT PPID_[$name]=$PROXY_PID PREQ[$name]=0 PTICK[$name]=0 PUTICK[$name]=0
        run_wrk "$PROXY_PORT" "$WARMUP" "$TMP/pick-warm-$name.txt"
    done
    read -ra order <<<"$PICK_CONFIGS"
    for ((r = 0; r < PICK_ROUNDS; r++)); do
        for ((i = 0; i < ${#order[@]}; i++)); do
            k=$(((i + r) % ${#order[@]}))
            name=${order[$k]}
            [[ -n ${PPORT[$name]:-} ]] || continue
            PROXY_PID=${PPID_[$name]} PROXY_PORT=${PPORT[$name]}
            wout=$TMP/pick-$name-$r.txt
            read -r req rps p50 p90 p99 err ticks slow total bticks uticks < <(measure "$name" "$PICK_DURATION" "$wout")
            PREQ[$name]=$((PREQ[$name] + req)) PTICK[$name]=$((PTICK[$name] + ticks)) PUTICK[$name]=$((PUTICK[$name] + uticks))
            PROUND[$name]+="$(awk -v t="$ticks" -v hz="$CLK_TCK" -v n="$req" 'BEGIN { printf "%.2f", n ? t * 1e6 / hz / n : 0 }') "
            log "  pick round $((r + 1)) $name: $rps req/s, p99 ${p99}us, $ticks ticks"
        done
    done
    for name in $PICK_CONFIGS; do
        [[ -n ${PPID_[$name]:-} ]] || continue
        stop_tree "${PPID_[$name]}"
        note_log "$name" "pick "
    done
    return 0
}

pick_user() { awk -v t="${PUTICK[$1]:-0}" -v n="${PREQ[$1]:-0}" -v hz="$CLK_TCK" 'BEGIN { if (n) printf "%.2f", t * 1e6 / hz / n; else print "–" }'; }
pick_cpu() { awk -v t="${PTICK[$1]:-0}" -v n="${PREQ[$1]:-0}" -v hz="$CLK_TCK" 'BEGIN { if (n) printf "%.2f", t * 1e6 / hz / n; else print "–" }'; }
pct() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%+.1f%%", 100 * (a - b) / b; else print "–" }'; }
within() { awk -v a="$1" -v b="$2" -v lim="$3" 'BEGIN { if (!(a + 0 > 0 && b + 0 > 0)) print "not measured"; else if (100 * (a - b) / b <= lim) print "met"; else print "**missed**" }'; }

# ---------------------------------------------------------------------------
# CALLGRIND=1: the exact version of part 2. Each of the four configurations
# with one worker under callgrind: counters zeroed after a warm-up, dumped
# after a measured wrk run; instructions per request, and the inclusive cost
# of mp_balancer_pick (the whole pick: server state, and for the Lua modules
# the call into the VM) per request. (cg_incl: scripts/bench/lib.sh.)

declare -A CG=()    # CG[name] = "requests Ir/req pick_Ir/req slow_share_%"
callgrind_mode() {
    local name dir dump req ir pick i s0 s1 b0 b1
    command -v callgrind_control >/dev/null || die "callgrind_control missing (apt-get install valgrind)"
    for name in $PICK_CONFIGS; do
        dir=$TMP/$name
        mkdir -p "$dir"
        PROXY_WRAP=(valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out.%p")
        PROXY_WORKERS=1 PROXY_WAIT=600
        log "$name: starting under callgrind"
        if ! start_proxy "$name"; then
            FAILED[cg:$name]=$START_ERR
            log "  $name: $START_ERR"
            [[ -n ${PROXY_PID:-} ]] && stop_tree "$PROXY_PID"
            continue
        fi
        run_wrk "$PROXY_PORT" 2s "$dir/warm.txt"
        callgrind_control -z "$PROXY_PID" >>"$dir/vgdb.log" 2>&1 || die "callgrind_control -z $PROXY_PID failed" "$dir/vgdb.log"
        s0=$(slow_requests) b0=$(backend_requests)
        run_wrk "$PROXY_PORT" "$CG_DURATION" "$dir/wrk.txt"
        callgrind_control -d "$PROXY_PID" >>"$dir/vgdb.log" 2>&1 || die "callgrind_control -d $PROXY_PID failed" "$dir/vgdb.log"
        sleep "$SETTLE"
        s1=$(slow_requests) b1=$(backend_requests)
        req=$(parse_wrk "$dir/wrk.txt" | awk '{ print $1 }')
        dump=$dir/callgrind.out.$PROXY_PID.1
        for ((i = 0; i < 100; i++)); do [[ -s $dump ]] && break; sleep 0.1; done
        [[ -s $dump ]] || die "$name: no callgrind dump at $dump" "$dir/vgdb.log"
        stop_tree "$PROXY_PID"
        note_log "$name" "callgrind "
        ((req > 0)) || { FAILED[cg:$name]="wrk completed no request"; continue; }
        cp "$dump" "$ROOT/build/callgrind.out.tail-$name"
        ir=$(awk '/^(summary|totals):/ { print $2; exit }' "$dump")
        pick=$(cg_incl "$dump" mp_balancer_pick)
        CG[$name]=$(awk -v n="$req" -v ir="$ir" -v p="$pick" -v s=$((s1 - s0)) -v t=$((b1 - b0 - 1)) \
            'BEGIN { printf "%d %.0f %.0f %.2f", n, ir / n, p / n, (t > 0 ? 100 * s / t : 0) }')
        log "  $name: ${CG[$name]}"
    done
    PROXY_WRAP=() PROXY_WORKERS="" PROXY_WAIT=""
}

cg_report() {
    local bal c l cn cir cpk cs ln lir lpk ls
    echo "## Lua balancer modules vs the C fast paths: instructions per request ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "moonproxy with 1 worker under callgrind, the same three backends (one ${SLOW_MS} ms slow), wrk -t $THREADS -c $CONNS -d $CG_DURATION after a 2 s warm-up;" \
        "counters zeroed after the warm-up. Ir/req: every instruction of the process over requests completed (exact, unlike CPU time on a shared machine)." \
        "pick Ir/req: inclusive cost of mp_balancer_pick (for the Lua modules: building the call, the VM, the policy)."
    echo "Ir counts user-space instructions only; most of a proxy's CPU time per request on loopback is in the kernel (see CPU µs/req in the default run), so a Ir difference overstates the CPU-time one."
    echo "Versions: $(versions)."
    echo
    echo "| balancer | C Ir/req | Lua Ir/req | Lua − C (whole request) | target ≤ +5% | C pick Ir/req | Lua pick Ir/req | slow share C / Lua | requests C / Lua |"
    echo "|---|---:|---:|---:|---|---:|---:|---:|---:|"
    for bal in p2c ewma; do
        c=mp-$bal l=mp-lua-$bal
        if [[ -z ${CG[$c]:-} || -z ${CG[$l]:-} ]]; then
            echo "| $bal | did not run: $(oneline "${FAILED[cg:$c]:-${FAILED[cg:$l]:-}}") | | | | | | | |"
            continue
        fi
        read -r cn cir cpk cs <<<"${CG[$c]}"
        read -r ln lir lpk ls <<<"${CG[$l]}"
        echo "| $bal | $cir | $lir | $(pct "$lir" "$cir") | $(within "$lir" "$cir" 5) | $cpk | $lpk | $cs% / $ls% | $cn / $ln |"
    done
    echo
    if ((${#LOGNOTES[@]})); then
        echo "moonproxy logged warnings or errors:"
        echo
        for bal in "${LOGNOTES[@]}"; do echo "- $(oneline "$bal")"; done
        echo
    fi
    echo "Profiles kept in build/callgrind.out.tail-<configuration> (callgrind_annotate --inclusive=yes them)."
    echo
    echo "Run time: $(( $(date +%s) - T_START )) s."
}

# ---------------------------------------------------------------------------

versions() {
    local n h w m
    n=$("$NGINX" -v 2>&1 || true)
    h=$("$HAPROXY" -v 2>/dev/null || true)
    w=$("$WRK" -v 2>&1 || true)
    m=$("$BIN" --version 2>/dev/null || true)
    h=${h%%$'\n'*} w=${w%%$'\n'*} m=${m%%$'\n'*}
    printf '%s, %s, %s, %s' "$m" "${n##*: }" "$(awk '{ print $1, $3 }' <<<"$h")" "$(awk '{ print $1, $2 }' <<<"$w")"
}

report() {
    local name req rps p50 p90 p99 err cpu share bcpu slow total ucpu best="" bestname="" v mpbest="" mpname=""
    echo "## tail latency, one of three servers slow ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "Loopback, $(nproc) CPUs (shared: compare rows of one run), $WORKERS workers per proxy." \
        "Backends: one nginx (2 workers) on three ports, two answering at once, one after ${SLOW_MS} ms (ngx.sleep)." \
        "Load: closed loop, wrk -t $THREADS -c $CONNS -d $DURATION --latency after a $WARMUP warm-up, each proxy alone."
    echo "Versions: $(versions)."
    echo "Load average (1 min) at start: $LOAD0, at end: $(cut -d' ' -f1 /proc/loadavg)."
    echo "Slow share: requests the slow server answered ÷ requests all three answered, during the measured run (backend access log and stub_status)." \
        "CPU µs/req: the proxy's utime+stime over requests completed (\"of which user\": utime alone; the balancer runs there, most of the rest is the kernel's loopback TCP). Backend CPU: the backend nginx's CPU over the run (100% = one core)."
    echo
    echo "| proxy | balancer | req/s | p50 | p90 | p99 | slow share | CPU µs/req | of which user | backend CPU | errors |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for name in $CONFIGS; do
        IFS='|' read -r pn bn <<<"${LABEL[$name]:-$name|}"
        if [[ -n ${FAILED[$name]:-} ]]; then
            echo "| $pn | $bn | did not run: $(oneline "${FAILED[$name]}") | | | | | | | | |"
            continue
        fi
        [[ -n ${RES[$name]:-} ]] || continue
        read -r req rps p50 p90 p99 err cpu share bcpu slow total ucpu <<<"${RES[$name]}"
        echo "| $pn | $bn | $rps | $(fmt_us "$p50") | $(fmt_us "$p90") | $(fmt_us "$p99") | $share% ($slow of $total) | $cpu | $ucpu | $bcpu% | $err |"
    done
    echo
    # Target 1: moonproxy p2c/ewma p99 <= the best of nginx/HAProxy.
    for name in nginx haproxy; do
        [[ -n ${RES[$name]:-} ]] || continue
        v=$(awk '{ print $5 }' <<<"${RES[$name]}")
        if [[ -z $best ]] || ((v < best)); then best=$v bestname=$name; fi
    done
    for name in mp-p2c mp-ewma; do
        [[ -n ${RES[$name]:-} ]] || continue
        v=$(awk '{ print $5 }' <<<"${RES[$name]}")
        if [[ -z $mpbest ]] || ((v < mpbest)); then mpbest=$v mpname=$name; fi
    done
    if [[ -n $best && -n $mpbest ]]; then
        echo "- p99: best of nginx/HAProxy = $(fmt_us "$best") ($bestname); moonproxy's best of p2c/ewma (C) = $(fmt_us "$mpbest") (${LABEL[$mpname]#*|})" \
            "— target (at or below): $( ((mpbest <= best)) && echo met || echo '**missed**')."
    else
        echo "- p99 target: not measured (a configuration did not run)."
    fi
    local c l
    for bal in p2c ewma; do
        [[ -n ${RES[mp-$bal]:-} && -n ${RES[mp-lua-$bal]:-} ]] || continue
        c=$(awk '{ print $7 }' <<<"${RES[mp-$bal]}") l=$(awk '{ print $7 }' <<<"${RES[mp-lua-$bal]}")
        echo "- $bal, single runs above: Lua $l vs C $c CPU µs/req ($(pct "$l" "$c"))."
    done
    echo
    if ((PICK_ROUNDS > 0)); then
        echo "### Lua balancer modules vs the C fast paths: CPU per request"
        echo
        echo "The four configurations running at once, driven in turn, $PICK_ROUNDS round(s) of wrk -d $PICK_DURATION (-c $CONNS, order rotating) after a $WARMUP warm-up each;" \
            "CPU µs/req pooled over the rounds (per round: the spread is the noise). Target: Lua ≤ C + 5%." \
            "CPU time on a shared machine is not precise to 5%: \`CALLGRIND=1 scripts/bench/tail.sh\` counts instructions instead."
        echo
        echo "| balancer | C µs/req | per round | Lua µs/req | per round | Lua − C | target ≤ +5% | user µs/req C / Lua | user Lua − C |"
        echo "|---|---:|---|---:|---|---:|---|---:|---:|"
        for bal in p2c ewma; do
            if [[ -n ${FAILED[pick:mp-$bal]:-} || -n ${FAILED[pick:mp-lua-$bal]:-} ]]; then
                echo "| $bal | did not run: $(oneline "${FAILED[pick:mp-$bal]:-${FAILED[pick:mp-lua-$bal]}}") | | | | | | | |"
                continue
            fi
            c=$(pick_cpu "mp-$bal") l=$(pick_cpu "mp-lua-$bal")
            echo "| $bal | $c | ${PROUND[mp-$bal]% } | $l | ${PROUND[mp-lua-$bal]% } | $(pct "$l" "$c") | $(within "$l" "$c" 5) |" \
                "$(pick_user "mp-$bal") / $(pick_user "mp-lua-$bal") | $(awk -v a="$(pick_user "mp-lua-$bal")" -v b="$(pick_user "mp-$bal")" 'BEGIN { printf "%+.2f µs", a - b }') |"
        done
        echo
    fi
    if ((${#LOGNOTES[@]})); then
        echo "moonproxy logged warnings or errors:"
        echo
        for v in "${LOGNOTES[@]}"; do echo "- $(oneline "$v")"; done
        echo
    fi
    echo "Run time: $(( $(date +%s) - T_START )) s."
}

main() {
    command -v "$WRK" >/dev/null || die "wrk missing (scripts/deps.sh bench)"
    command -v curl >/dev/null || die "curl missing"
    [[ -x $NGINX ]] || die "$NGINX missing (scripts/deps.sh bench)"
    [[ -x $HAPROXY ]] || die "$HAPROXY missing (scripts/deps.sh bench)"
    [[ -x $BIN ]] || die "$BIN missing (make all)"
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    mkdir -p "$(dirname "$OUT")"
    LOAD0=$(cut -d' ' -f1 /proc/loadavg)
    start_backend
    if [[ $CALLGRIND == 1 ]]; then
        callgrind_mode
        cg_report >"$TMP/report.md"
        cp "$TMP/report.md" "$OUT"
        cat "$TMP/report.md"
        log "written to $OUT"
        return 0
    fi
    local name
    for name in $CONFIGS; do run_one "$name"; done
    ((PICK_ROUNDS > 0)) && pick_bench
    report >"$TMP/report.md"
    cp "$TMP/report.md" "$OUT"
    cat "$TMP/report.md"
    log "written to $OUT"
}

main "$@"
