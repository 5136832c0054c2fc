#!/usr/bin/env bash
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
#   The default run ends with a short version of HOOKS=1 (HOOK_ROUNDS=2 of
#   3 s, about 80 s; whole default run about 3.5 min, under 4), appended to OUT and
#   written to build/bench-hooks.md; SHORT_HOOKS=0 leaves it out.
#   HOOK_PROXIES, HOOK_CONNS="10 100", HOOK_ROUNDS, HOOK_DURATION
#
# Every process started here is stopped by PID on exit, and the temp dir goes.
set -Eeuo pipefail
BENCH_NAME=bench
# shellcheck source-path=SCRIPTDIR source=bench/lib.sh
. "$(dirname "$0")/bench/lib.sh"
# A failing command would otherwise end the run silently (set -e).
trap 'log "bench: failed at line $LINENO: $BASH_COMMAND"' ERR

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/build/moonproxy}
[[ $BIN == /* ]] || BIN=$PWD/$BIN

WORKERS=${WORKERS:-2}
CONNS=${CONNS:-1 10 100}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-1s}
IDLE_CONNS=${IDLE_CONNS:-9000}
CALLGRIND=${CALLGRIND:-0}
MALLOC_CHECK=${MALLOC_CHECK:-0}
HOOKS=${HOOKS:-0}
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
HOOKS_OUT=${HOOKS_OUT:-$ROOT/build/bench-hooks.md}
# The profiling modes write their own file: they must not clobber a comparison.
if [[ $HOOKS == 1 && $CALLGRIND == 1 ]]; then OUT=${OUT:-$ROOT/build/bench-hooks-callgrind.md}
elif [[ $CALLGRIND == 1 ]]; then OUT=${OUT:-$ROOT/build/bench-callgrind.md}
elif [[ $MALLOC_CHECK == 1 ]]; then OUT=${OUT:-$ROOT/build/bench-malloc.md}
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

# ---------------------------------------------------------------------------
# Measurements from /proc (cpu_ticks, rss_kib: scripts/bench/lib.sh).

# established PORT: proxy-side sockets of 127.0.0.1:PORT in ESTABLISHED state
# whose client side is ESTABLISHED too, from /proc/net/tcp. Proves the proxy
# still holds the idle client connections when we read its RSS (one that had
# closed them would look cheap).
established() {
    awk -v me="0100007F:$(printf '%04X' "$1")" '
        NR == 1 || $4 != "01"  { next }
        $2 == me               { srv[$3] = 1 }      # key: the client address
        $3 == me               { cli[$2] = 1 }
        END { for (k in srv) if (k in cli) n++; print n + 0 }' /proc/net/tcp
}

# upstream_accepts: the backend's "accepts" counter from stub_status. The
# query itself is one accept.
upstream_accepts() { stub_status "$BACKEND_PORT" 1; }

# ---------------------------------------------------------------------------
# wrk.

# Extra wrk arguments for every run: the hooks runs send a browser's usual
# request headers (wrk alone sends only Host, and a hook reading User-Agent
# would then find nothing).
WRK_ARGS=()
if [[ $BODY == chunked* ]]; then
    # a trailer field only with BODY=chunked-trailer
    if [[ $BODY == chunked-trailer ]]; then echo 'local trailer = "X-Checksum: 1\r\n"'; else echo 'local trailer = ""'; fi >"$TMP/chunked.lua"
    cat >>"$TMP/chunked.lua" <<'EOF'
-- POST / with a 4 KiB chunked body: four 1 KiB chunks, one with an
-- extension, as the client framed it.
local chunk = string.rep("x", 1024)
local parts = {}
for i = 1, 4 do
    parts[#parts + 1] = string.format("%x", #chunk) .. (i == 2 and ";ext=1" or "") .. "\r\n" .. chunk .. "\r\n"
end
local req = "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n" ..
    table.concat(parts) .. "0\r\n" .. trailer .. "\r\n"
request = function() return req end
EOF
    WRK_ARGS+=(-s "$TMP/chunked.lua")
fi
HOOK_REQ_HEADERS=(
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
    "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    "Accept-Encoding: gzip, deflate, br"
    "Accept-Language: en-US,en;q=0.5"
)

# run_wrk PORT CONNS DURATION OUTFILE: wrk needs threads <= connections.
run_wrk() {
    local port=$1 c=$2 d=$3 outf=$4 t=2
    ((c < t)) && t=$c
    "$WRK" -t "$t" -c "$c" -d "$d" --latency "${WRK_ARGS[@]}" "http://127.0.0.1:$port/" >"$outf" 2>&1 ||
        die "wrk failed against 127.0.0.1:$port" "$outf"
}

# ---------------------------------------------------------------------------
# Servers. Each start_* writes its config into the temp dir, starts the server
# in the foreground-mode it has (so $! is the real PID), and waits for its port.

# nginx_common, nginx_http_common, nginx_lua_modules: scripts/bench/lib.sh.

start_backend() {
    local dir=$TMP/backend
    mkdir -p "$dir"
    BACKEND_PORT=$(free_port)
    {
        nginx_common "$dir"
        cat <<EOF
worker_processes 1;
events { worker_connections 4096; }
http {
$(nginx_http_common "$dir")
    server {
        listen 127.0.0.1:$BACKEND_PORT backlog=4096;
        # X-Seen-Echo: what a hook set in the forwarded request (the hooks
        # runs check it); absent when the request has no x-seen.
        location / { add_header X-Seen-Echo \$http_x_seen; return 200 "hello world\n"; }
        location = /nginx_status { stub_status; }
    }
}
EOF
    } >"$dir/nginx.conf"
    start_nginx "$dir"
    BACKEND_PID=$LAST_PID
    wait_port "$BACKEND_PORT" "$BACKEND_PID" "backend nginx" ||
        die "$START_ERR" "$dir/error.log"
}

# start_proxy NAME: start one proxy in front of the backend. Sets PROXY_PID,
# PROXY_PORT, PROXY_LOG; returns 1 (START_ERR set) if it did not come up.
# The profiling modes set PROXY_WRAP (a command prefix: valgrind, env
# LD_PRELOAD=...), PROXY_WORKERS, PROXY_WAIT (start-up limit, tenths of s)
# and NGINX_MASTER (off under valgrind: the profiled process must be the one
# that serves).
PROXY_WRAP=()
start_proxy() {
    local name=$1 dir=$TMP/$1 workers=${PROXY_WORKERS:-$WORKERS} master=${NGINX_MASTER:-on}
    mkdir -p "$dir"
    PROXY_PORT=$(free_port)
    PROXY_LOG=$dir/stderr.log
    case $name in
    moonproxy | moonproxy-noop | moonproxy-hdr)
        write_moonproxy_cfg "$dir/cfg.lua" "$PROXY_PORT" "$workers" "${name#moonproxy}"
        # -t first: a config error then reads as one clear line.
        "$BIN" -t -c "$dir/cfg.lua" >"$dir/check.log" 2>&1 || {
            START_ERR="moonproxy -t rejected the config: $(head -c 500 "$dir/check.log")"
            return 1
        }
        start_bg "$PROXY_LOG" "${PROXY_WRAP[@]}" "$BIN" -c "$dir/cfg.lua" -w "$workers"
        ;;
    nginx | nginx-lua)
        local lua_load="" lua_access=""
        if [[ $name == nginx-lua ]]; then
            lua_load=$(nginx_lua_modules) || { START_ERR=$lua_load; return 1; }
            # The same work as moonproxy-hdr's hook. ngx.req.get_headers()
            # is how OpenResty code reads headers (ngx.var.http_* would
            # skip the table but is not the common idiom).
            lua_access='access_by_lua_block { local h = ngx.req.get_headers(); local a, b = h["user-agent"], h["accept"]; ngx.req.set_header("x-seen", a and "1" or "0") }'
        fi
        {
            echo "$lua_load"
            nginx_common "$dir" "$master"
            cat <<EOF
worker_processes $workers;
events { worker_connections 10240; }
http {
$(nginx_http_common "$dir")
    upstream b {
        server 127.0.0.1:$BACKEND_PORT;
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }
    server {
        # reuseport: one listening socket per worker, as moonproxy does.
        # Without it the kernel hands most connections to one worker, whose
        # in-flight upstream connections then overflow its 64-slot idle
        # cache and get closed and reopened all the time at 100 clients.
        listen 127.0.0.1:$PROXY_PORT backlog=4096 reuseport;
        location / {
            $lua_access
            proxy_pass http://b;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
        } >"$dir/nginx.conf"
        PROXY_LOG=$dir/error.log
        start_nginx "$dir" "${PROXY_WRAP[@]}"
        ;;
    haproxy)
        # maxconn: the hard RLIMIT_NOFILE here may be 20000 and HAProxy
        # sizes its fd table at about 2 x maxconn.
        {
            haproxy_common "$dir" "$workers" "$PROXY_PORT"
            echo "    server s1 127.0.0.1:$BACKEND_PORT"
        } >"$dir/haproxy.cfg"
        start_bg "$PROXY_LOG" "${PROXY_WRAP[@]}" "$HAPROXY" -f "$dir/haproxy.cfg" -db
        ;;
    *) die "unknown proxy $name" ;;
    esac
    PROXY_PID=$LAST_PID
    wait_port "$PROXY_PORT" "$PROXY_PID" "$name" "${PROXY_WAIT:-100}"
}

# write_moonproxy_cfg FILE PORT WORKERS [HOOK]: HOOK is "" (none), "-noop"
# (a global on_request hook that does nothing: the price of entering Lua) or
# "-hdr" (reads two request headers and sets one: a typical small hook).
write_moonproxy_cfg() {
    local hook=""
    case ${4:-} in
    -noop) hook='proxy.on_request(function(req) end)' ;;
    -hdr) hook='proxy.on_request(function(req) local h = req.headers; local a, b = h["user-agent"], h["accept"]; h["x-seen"] = a and "1" or "0" end)' ;;
    esac
    cat >"$1" <<EOF
local proxy = require "moonproxy"
proxy.listen { addr = "127.0.0.1:$2" }
proxy.settings { workers = $3, access_log = false, shutdown_timeout = 2 }
local b = proxy.upstream "b" { servers = { "127.0.0.1:$BACKEND_PORT" }, keepalive = 64 }
proxy.route { prefix = "/", upstream = b }
$hook
EOF
}

# ---------------------------------------------------------------------------
# The comparison.

declare -A RES=()      # RES[proxy:conns] = "requests rps p50 p99 errors cpu_us_per_req upstream_conns"
declare -A IDLE=()     # IDLE[proxy] = "opened rss_before rss_after held"
declare -A FAILED=()   # FAILED[proxy] = why it has no figures

# bench_proxy NAME: the wrk runs at every concurrency against the running proxy.
bench_proxy() {
    local name=$1 c pids t0 t1 a0 a1 wout
    local req rps p50 p99 err cpu_us
    for c in $CONNS; do
        wout=$TMP/wrk-$name-$c.txt
        run_wrk "$PROXY_PORT" "$c" "$WARMUP" "$wout"      # fill pools, fault pages in
        pids=$(proc_tree "$PROXY_PID")
        a0=$(upstream_accepts)
        # shellcheck disable=SC2086
        t0=$(cpu_ticks $pids)
        run_wrk "$PROXY_PORT" "$c" "$DURATION" "$wout"
        # shellcheck disable=SC2086
        t1=$(cpu_ticks $pids)
        a1=$(upstream_accepts)
        read -r req rps p50 _ p99 err < <(parse_wrk "$wout")
        ((req > 0)) || die "$name: wrk completed no request at -c $c" "$wout"
        cpu_us=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$req" 'BEGIN { printf "%.2f", t * 1e6 / hz / n }')
        RES[$name:$c]="$req $rps $p50 $p99 $err $cpu_us $((a1 - a0 - 1))"
        log "  $name -c $c: $rps req/s, p50 ${p50}us, p99 ${p99}us, CPU ${cpu_us}us/req, upstream conns $((a1 - a0 - 1)), errors $err"
    done
}

# idle_memory NAME: RSS of the proxy before and while it holds IDLE_CONNS idle
# keep-alive connections (each has served one request).
idle_memory() {
    local name=$1 pids r0 r1 held opened="" stopf outf pid i
    stopf=$TMP/idle-$name.stop outf=$TMP/idle-$name.out
    ((IDLE_CONNS > 0)) || return 0
    pids=$(proc_tree "$PROXY_PID")
    # shellcheck disable=SC2086
    r0=$(rss_kib $pids)
    start_bg "$outf" "$LUAJIT" "$IDLE_SCRIPT" 127.0.0.1 "$PROXY_PORT" "$IDLE_CONNS" "$stopf" 120
    pid=$LAST_PID
    for ((i = 0; i < 1000; i++)); do            # <= 100 s; the client's own deadline is 90 s
        opened=$(awk '/^opened/ { print $2 }' "$outf")
        [[ -n $opened ]] && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if [[ -z $opened ]]; then
        stop_tree "$pid"
        FAILED[$name:idle]="idle client failed: $(tail -n 3 "$outf" | tr '\n' ' ')"
        log "  $name: ${FAILED[$name:idle]}"
        return 0
    fi
    sleep 1                                      # let lazily-freed buffers settle
    # shellcheck disable=SC2086
    r1=$(rss_kib $pids)
    held=$(established "$PROXY_PORT")
    : >"$stopf"
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    stop_tree "$pid"
    IDLE[$name]="$opened $r0 $r1 $held"
    log "  $name: $opened idle conns ($held held open by the proxy): RSS $r0 -> $r1 KiB ($(awk -v a="$r0" -v b="$r1" -v n="$opened" 'BEGIN { printf "%.2f", (b - a) / n }') KiB/conn)"
    grep -q '^idle_conns:' "$outf" && log "  $(grep '^idle_conns:' "$outf" | head -n 2)"
    return 0
}

report() {
    local name c req rps p50 p99 err cpu up ratio ncpu r0 r1 held
    echo "## moonproxy benchmark ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "Loopback, $(nproc) CPUs (shared, noisy: compare rows of one run, not runs)," \
        "$WORKERS workers per proxy, wrk -d $DURATION after a $WARMUP warm-up," \
        "backend: nginx with 1 worker returning \"hello world\"."
    echo "Versions: $(versions)."
    echo "Load average (1 min) at start: $LOAD0, at end: $(cut -d' ' -f1 /proc/loadavg) (other work on the machine skews single rows)."
    echo "CPU µs/req: the proxy's utime+stime (all its processes/threads) over requests completed."
    echo "Upstream conns: connections the backend accepted during the measured run (after the warm-up)."
    echo
    echo "| proxy | conns | req/s | p50 | p99 | CPU µs/req | CPU/req vs nginx | upstream conns opened | errors |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    for name in $PROXIES; do
        if [[ -n ${FAILED[$name]:-} ]]; then
            echo "| $name | | ${FAILED[$name]} | | | | | | |"
            continue
        fi
        for c in $CONNS; do
            [[ -n ${RES[$name:$c]:-} ]] || continue
            read -r req rps p50 p99 err cpu up <<<"${RES[$name:$c]}"
            ratio="–"
            if [[ -n ${RES[nginx:$c]:-} ]]; then
                ncpu=$(awk '{ print $6 }' <<<"${RES[nginx:$c]}")
                ratio=$(awk -v a="$cpu" -v b="$ncpu" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "–" }')
            fi
            echo "| $name | $c | $rps | $(fmt_us "$p50") | $(fmt_us "$p99") | $cpu | $ratio | $up | $err |"
        done
    done
    # Say when a pool overflowed: it explains a CPU/req figure.
    for name in $PROXIES; do
        for c in $CONNS; do
            [[ -n ${RES[$name:$c]:-} ]] || continue
            read -r req rps p50 p99 err cpu up <<<"${RES[$name:$c]}"
            if ((up * 100 > req)); then
                echo
                echo "Note: $name at $c connections opened $up upstream connections for $req requests:" \
                    "its idle pool (keepalive 64 per worker) did not hold them, which costs CPU per request."
            fi
        done
    done
    echo
    if ((IDLE_CONNS > 0)); then
        echo "Idle memory ($IDLE_CONNS keep-alive client connections, each after one request; RSS summed over the proxy's processes):"
        echo
        for name in $PROXIES; do
            if [[ -n ${IDLE[$name]:-} ]]; then
                read -r c r0 r1 held <<<"${IDLE[$name]}"
                echo "- $name: $c idle connections ($held still open on the proxy's side when measured): RSS $r0 KiB -> $r1 KiB, $(awk -v a="$r0" -v b="$r1" -v n="$c" 'BEGIN { printf "%.2f", (b - a) / n }') KiB per connection"
            elif [[ -n ${FAILED[$name:idle]:-} ]]; then
                echo "- $name: ${FAILED[$name:idle]}"
            elif [[ -n ${FAILED[$name]:-} ]]; then
                echo "- $name: ${FAILED[$name]}"
            fi
        done
        echo
    fi
}

# versions: one line. Whole outputs are captured first: "head -n 1" on a
# pipe would SIGPIPE the tool and fail the pipeline (wrk -v also exits 1).
versions() {
    local n h w
    n=$("$NGINX" -v 2>&1 || true)
    h=$("$HAPROXY" -v 2>/dev/null || true)
    w=$("$WRK" -v 2>&1 || true)
    h=${h%%$'\n'*} w=${w%%$'\n'*}
    printf '%s, %s, %s%s' "${n##*: }" "$(awk '{ print $1, $3 }' <<<"$h")" \
        "$(awk '{ print $1, $2 }' <<<"$w")" "${MP_VERSION:+, $MP_VERSION}"
}

# available NAMES...: those that can run, space-separated: the moonproxy
# configurations only if the binary is built (the server may not exist yet).
available() {
    local p
    for p in "$@"; do
        if [[ $p == moonproxy* ]]; then
            if [[ ${SKIP_MOONPROXY:-0} == 1 ]]; then log "$p: skipped (SKIP_MOONPROXY=1)"; continue; fi
            if [[ ! -x $BIN ]]; then log "$p: not built ($BIN missing)"; continue; fi
        fi
        printf ' %s' "$p"
    done
}

select_proxies() {
    # shellcheck disable=SC2086
    PROXIES=$(available $PROXIES)
    if [[ -x $BIN ]]; then
        MP_VERSION=$("$BIN" --version 2>/dev/null || true)
        MP_VERSION=${MP_VERSION%%$'\n'*}
    fi
}

compare() {
    local name
    select_proxies
    LOAD0=$(cut -d' ' -f1 /proc/loadavg)
    start_backend
    log "backend nginx on 127.0.0.1:$BACKEND_PORT"
    for name in $PROXIES; do
        log "$name: starting ($WORKERS workers)"
        if ! start_proxy "$name"; then
            FAILED[$name]="did not start: $(oneline "$START_ERR")"
            log "$name: $START_ERR"
            [[ -s ${PROXY_LOG:-} ]] && tail -n 20 "$PROXY_LOG" >&2
            [[ -n ${PROXY_PID:-} ]] && stop_tree "$PROXY_PID"
            continue
        fi
        bench_proxy "$name"
        idle_memory "$name"
        stop_tree "$PROXY_PID"
    done
    report | tee "$OUT"
    log "written to $OUT"
    # A proxy that would not start fails the run, after the others reported.
    local p
    for p in "${!FAILED[@]}"; do [[ $p == *:* ]] || STATUS=1; done
}

# ---------------------------------------------------------------------------
# Hooks: what running Lua for every request costs, next to nginx running the
# same Lua through lua-nginx-module. All configurations run at once, each on
# its own port (an idle proxy burns no CPU), and are driven one after the
# other in rounds whose order rotates: load from other work on this shared
# machine then spreads over all of them instead of landing on whichever one
# happened to run at the time, which matters for a 10% target.

declare -A HPID=()      # HPID[config] = PID
declare -A HPORT=()     # HPORT[config] = its port
declare -A HACC=()      # HACC[config:conns] = "requests ticks": summed over rounds
declare -A HROUND=()    # HROUND[config:conns] = lines "cpu_us rps p50 p99 errors", one per round
HOOK_LIST=()

# check_hook NAME PORT: one request through the proxy with a User-Agent; the
# backend echoes the x-seen it received. moonproxy-hdr and nginx-lua must
# have set it to 1, the others must not have touched it: proves that each
# configuration does the work it is timed for.
check_hook() {
    local name=$1 port=$2 fd line status="" seen="" want=""
    [[ $name == moonproxy-hdr || $name == nginx-lua ]] && want=1
    exec {fd}<>"/dev/tcp/127.0.0.1/$port" || { START_ERR="check: cannot connect"; return 1; }
    printf 'GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: bench\r\nAccept: */*\r\nConnection: close\r\n\r\n' >&"$fd"
    while IFS= read -r -t 5 line <&"$fd"; do
        line=${line%$'\r'}
        [[ -z $line ]] && break
        [[ -z $status ]] && status=$line
        if [[ ${line,,} == x-seen-echo:* ]]; then seen=${line#*:} seen=${seen// /}; fi
    done
    exec {fd}>&-
    [[ $status == "HTTP/1.1 200"* && $seen == "$want" ]] && return 0
    START_ERR="check failed: status '$status', backend saw x-seen '$seen', expected '$want'"
    return 1
}

# hook_run NAME CONNS: one measured wrk run against a running configuration.
hook_run() {
    local name=$1 c=$2 pids t0 t1 wout=$TMP/hooks-wrk-$1-$2.txt
    local req rps p50 p99 err cpu_us acc_req acc_t
    run_wrk "${HPORT[$name]}" "$c" "$WARMUP" "$wout"
    pids=$(proc_tree "${HPID[$name]}")
    # shellcheck disable=SC2086
    t0=$(cpu_ticks $pids)
    run_wrk "${HPORT[$name]}" "$c" "$HOOK_DURATION" "$wout"
    # shellcheck disable=SC2086
    t1=$(cpu_ticks $pids)
    read -r req rps p50 _ p99 err < <(parse_wrk "$wout")
    ((req > 0)) || die "$name: wrk completed no request at -c $c" "$wout"
    cpu_us=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$req" 'BEGIN { printf "%.2f", t * 1e6 / hz / n }')
    read -r acc_req acc_t <<<"${HACC[$name:$c]:-0 0}"
    HACC[$name:$c]="$((acc_req + req)) $((acc_t + t1 - t0))"
    HROUND[$name:$c]+="$cpu_us $rps $p50 $p99 $err"$'\n'
    log "  $name -c $c: $rps req/s, p50 ${p50}us, p99 ${p99}us, CPU ${cpu_us}us/req, errors $err"
}

hooks_bench() {
    local name c r i n h
    # shellcheck disable=SC2086
    read -ra HOOK_LIST <<<"$(available $HOOK_PROXIES)"
    ((${#HOOK_LIST[@]})) || die "hooks: no configuration can run"
    [[ -n ${BACKEND_PID:-} ]] || start_backend
    HLOAD0=$(cut -d' ' -f1 /proc/loadavg)
    WRK_ARGS=()
    for h in "${HOOK_REQ_HEADERS[@]}"; do WRK_ARGS+=(-H "$h"); done
    for name in "${HOOK_LIST[@]}"; do
        log "hooks: starting $name ($WORKERS workers)"
        PROXY_PID="" PROXY_LOG=""      # so a failed start stops nothing else
        if start_proxy "$name" && check_hook "$name" "$PROXY_PORT"; then
            HPID[$name]=$PROXY_PID HPORT[$name]=$PROXY_PORT
            continue
        fi
        FAILED[hooks:$name]="did not start: $(oneline "$START_ERR")"
        STATUS=1
        log "hooks: $name: $START_ERR"
        [[ -s ${PROXY_LOG:-} ]] && tail -n 20 "$PROXY_LOG" >&2
        [[ -n ${PROXY_PID:-} ]] && stop_tree "$PROXY_PID"
    done
    n=${#HOOK_LIST[@]}
    for ((r = 0; r < HOOK_ROUNDS; r++)); do
        log "hooks: round $((r + 1)) of $HOOK_ROUNDS"
        for c in $HOOK_CONNS; do
            for ((i = 0; i < n; i++)); do
                name=${HOOK_LIST[(i + r) % n]}
                [[ -n ${HPID[$name]:-} ]] && hook_run "$name" "$c"
            done
        done
    done
    WRK_ARGS=()
    for name in "${!HPID[@]}"; do stop_tree "${HPID[$name]}"; done
}

# median_field COL LINES: the median of column COL over the lines.
median_field() {
    awk -v k="$1" 'NF { print $k }' <<<"$2" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR) print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
}

# hook_cpu NAME CONNS: CPU µs/request over all rounds (ticks over requests).
hook_cpu() {
    local req t
    [[ -n ${HACC[$1:$2]:-} ]] || return 0
    read -r req t <<<"${HACC[$1:$2]}"
    awk -v t="$t" -v hz="$CLK_TCK" -v n="$req" 'BEGIN { printf "%.2f", t * 1e6 / hz / n }'
}

# ratio A B: A / B with two decimals, "–" if either is missing.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0 && b > 0) printf "%.2f", a / b; else print "–" }'; }

# verdict RATIO TARGET: "met" or "missed" (RATIO <= TARGET).
verdict() { awk -v r="$1" -v t="$2" 'BEGIN { if (r == "–") print "not measured"; else if (r <= t) print "met"; else print "**missed**" }'; }

declare -A HOOK_LABEL=(
    [moonproxy]="moonproxy, no hook"
    [moonproxy-noop]="moonproxy, trivial hook"
    [moonproxy-hdr]="moonproxy, header hook"
    [nginx-lua]="nginx + lua, header hook"
    [nginx]="nginx, plain"
)

hooks_report() {
    local name c lines rps p50 p99 err cpu spread base ng r1 r2 req acc_t
    echo "## hooks: CPU per request with a Lua hook ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "Same backend, $WORKERS workers each, all configurations running at once and driven in turn," \
        "$HOOK_ROUNDS round(s) (order rotating) of wrk -d $HOOK_DURATION after a $WARMUP warm-up, per connection count." \
        "Every request carries User-Agent, Accept, Accept-Encoding and Accept-Language (wrk -H)." \
        "Load average (1 min) at start: $HLOAD0, at end: $(cut -d' ' -f1 /proc/loadavg)."
    echo "Hooks: trivial = \`proxy.on_request(function(req) end)\`; header = read user-agent and accept, set x-seen" \
        "(moonproxy: \`req.headers\`; nginx: \`access_by_lua_block\` with \`ngx.req.get_headers()\` and \`ngx.req.set_header\`)." \
        "Each configuration was checked to forward x-seen as expected before measuring."
    echo "CPU µs/req: the proxy's utime+stime over all rounds' requests; \"per round\": each round's figure (the spread is the noise)." \
        "req/s: mean over rounds; p50/p99: median over rounds."
    echo
    echo "| configuration | conns | req/s | p50 | p99 | CPU µs/req | per round | vs moonproxy no hook | vs nginx + lua | errors |"
    echo "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"
    for name in "${HOOK_LIST[@]}"; do
        if [[ -n ${FAILED[hooks:$name]:-} ]]; then
            echo "| ${HOOK_LABEL[$name]:-$name} | | ${FAILED[hooks:$name]} | | | | | | | |"
            continue
        fi
        for c in $HOOK_CONNS; do
            [[ -n ${HACC[$name:$c]:-} ]] || continue
            lines=${HROUND[$name:$c]}
            read -r req acc_t <<<"${HACC[$name:$c]}"
            rps=$(awk 'NF { s += $2; n++ } END { printf "%.0f", s / n }' <<<"$lines")
            p50=$(median_field 3 "$lines") p99=$(median_field 4 "$lines")
            err=$(awk 'NF { s += $5 } END { print s + 0 }' <<<"$lines")
            spread=$(awk 'NF { printf "%s%s", sep, $1; sep = ", " }' <<<"$lines")
            cpu=$(hook_cpu "$name" "$c")
            echo "| ${HOOK_LABEL[$name]:-$name} | $c | $rps | $(fmt_us "$p50") | $(fmt_us "$p99") | $cpu | $spread |" \
                "$(ratio "$cpu" "$(hook_cpu moonproxy "$c")") | $(ratio "$cpu" "$(hook_cpu nginx-lua "$c")") | $err |"
        done
    done
    echo
    for c in $HOOK_CONNS; do
        base=$(hook_cpu moonproxy "$c") ng=$(hook_cpu nginx-lua "$c")
        r1=$(ratio "$(hook_cpu moonproxy-noop "$c")" "$base")
        r2=$(ratio "$(hook_cpu moonproxy-hdr "$c")" "$ng")
        echo "- $c connections: trivial hook ÷ no hook = **$r1** (target ≤ 1.10: $(verdict "$r1" 1.10));" \
            "header hook ÷ nginx + lua = **$r2** (target ≤ 0.80: $(verdict "$r2" 0.80));" \
            "header hook ÷ no hook = $(ratio "$(hook_cpu moonproxy-hdr "$c")" "$base");" \
            "nginx + lua ÷ nginx = $(ratio "$ng" "$(hook_cpu nginx "$c")")."
    done
    echo
    echo "Exact instruction counts for the moonproxy configurations: \`HOOKS=1 CALLGRIND=1 scripts/bench.sh\`."
}

# ---------------------------------------------------------------------------
# CALLGRIND=1: each proxy with one worker under callgrind (moonproxy -w 1;
# nginx and HAProxy as a reference: instruction counts do not care how noisy
# the machine is). Counters are zeroed after a warm-up (callgrind_control
# talks to the running process through vgdb) and dumped right after the
# measured wrk run, so start-up, config load and shutdown are not counted.

# cg_top DUMP: the 15 functions with the most self cost. Frames that were on
# the stack when the counters were zeroed (main, __libc_start_main, the event
# loop) show up as the whole total in a zeroed dump: they are left out.
cg_top() {
    # Through a file: awk stops early, and a SIGPIPE'd callgrind_annotate
    # would fail the pipeline (pipefail).
    callgrind_annotate --threshold=100 "$1" >"$1.txt" 2>/dev/null || true
    awk '
        /file:function/      { on = 1; next }
        !on || /^-+$/        { next }
        NF == 0              { if (n) exit; next }
        /\(100\.0%\)/         { next }
        { sub(/ \[.*\//, " ["); print; if (++n == 15) exit }' "$1.txt"
}

# cg_incl DUMP FUNCTION: the inclusive Ir of FUNCTION (0 if never called).
cg_incl() {
    [[ -s $1.incl.txt ]] || callgrind_annotate --inclusive=yes --threshold=100 "$1" >"$1.incl.txt" 2>/dev/null || true
    awk -v f=":$2 " 'index($0, f) { gsub(/,/, "", $1); print $1; found = 1; exit }
                     END { if (!found) print 0 }' "$1.incl.txt"
}

callgrind_mode() {
    local name dir req ir i c=10 dump ref=nginx tag="" h pre rel
    command -v callgrind_control >/dev/null || die "callgrind_control missing (scripts/deps.sh bench)"
    # HOOKS=1: the hook configurations, against moonproxy without a hook, with
    # the browser-like request headers the hooks read.
    if [[ $HOOKS == 1 ]]; then
        ref=moonproxy tag=hooks-
        for h in "${HOOK_REQ_HEADERS[@]}"; do WRK_ARGS+=(-H "$h"); done
    fi
    select_proxies
    start_backend
    mkdir -p "$ROOT/build"
    {
        echo "## instructions per request under callgrind (1 worker, wrk -c $c for 5 s after a 2 s warm-up${tag:+, requests with User-Agent, Accept, Accept-Encoding, Accept-Language})"
        echo
        echo "| proxy | requests | instructions (Ir) | Ir/request | vs $ref |"
        echo "|---|---:|---:|---:|---:|"
    } >"$TMP/cg.md"
    : >"$TMP/cg-top.md"
    {
        echo "Entering Lua, per request (inclusive Ir: mp_hook_pre runs the on_request chain, mp_hook_release drops the request's Lua objects):"
        echo
        echo "| proxy | mp_hook_pre | mp_hook_release | together | Ir/request − $ref |"
        echo "|---|---:|---:|---:|---:|"
    } >"$TMP/cg-hooks.md"
    declare -A irq=()
    for name in $PROXIES; do
        dir=$TMP/$name
        mkdir -p "$dir"
        PROXY_WRAP=(valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out.%p")
        PROXY_WORKERS=1 PROXY_WAIT=600 NGINX_MASTER=off
        log "$name: starting under callgrind"
        if ! start_proxy "$name"; then
            echo "| $name | did not start: $(oneline "$START_ERR") | | | |" >>"$TMP/cg.md"
            [[ -n ${PROXY_PID:-} ]] && stop_tree "$PROXY_PID"
            continue
        fi
        run_wrk "$PROXY_PORT" "$c" 2s "$dir/warm.txt"
        callgrind_control -z "$PROXY_PID" >>"$dir/vgdb.log" 2>&1 || die "callgrind_control -z $PROXY_PID failed" "$dir/vgdb.log"
        run_wrk "$PROXY_PORT" "$c" 5s "$dir/wrk.txt"
        callgrind_control -d "$PROXY_PID" >>"$dir/vgdb.log" 2>&1 || die "callgrind_control -d $PROXY_PID failed" "$dir/vgdb.log"
        req=$(parse_wrk "$dir/wrk.txt" | awk '{ print $1 }')
        dump=$dir/callgrind.out.$PROXY_PID.1
        for ((i = 0; i < 50; i++)); do [[ -s $dump ]] && break; sleep 0.1; done
        [[ -s $dump ]] || die "$name: no callgrind dump at $dump"
        stop_tree "$PROXY_PID"
        # "summary:" (older: "totals:") is the total of the first event, Ir.
        ir=$(awk '/^(summary|totals):/ { print $2; exit }' "$dump")
        irq[$name]=$(awk -v a="$ir" -v n="$req" 'BEGIN { printf "%.0f", a / n }')
        cp "$dump" "$ROOT/build/callgrind.out.$tag$name"
        log "  $name: $req requests, ${irq[$name]} instructions/request"
        echo "| $name | $req | $ir | ${irq[$name]} | $(awk -v a="${irq[$name]}" -v b="${irq[$ref]:-0}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "–" }') |" >>"$TMP/cg.md"
        if [[ $name == moonproxy* ]]; then
            pre=$(cg_incl "$dump" mp_hook_pre) rel=$(cg_incl "$dump" mp_hook_release)
            awk -v n="$name" -v p="$pre" -v r="$rel" -v q="$req" -v a="${irq[$name]}" -v b="${irq[$ref]:-0}" 'BEGIN {
                d = (b > 0) ? sprintf("%+d", a - b) : "–"
                printf "| %s | %.0f | %.0f | %.0f | %s |\n", n, p / q, r / q, (p + r) / q, d }' >>"$TMP/cg-hooks.md"
        fi
        {
            echo "Top functions by self cost, $name:"
            echo
            echo '```'
            cg_top "$dump"
            echo '```'
            echo
        } >>"$TMP/cg-top.md"
    done
    PROXY_WRAP=() PROXY_WORKERS="" PROXY_WAIT="" NGINX_MASTER="" WRK_ARGS=()
    {
        cat "$TMP/cg.md"
        echo
        if [[ $HOOKS == 1 ]]; then
            cat "$TMP/cg-hooks.md"
            echo
        fi
        echo "Profiles kept in build/callgrind.out.$tag<proxy> (callgrind_annotate them)."
        echo
        cat "$TMP/cg-top.md"
    } | tee "$OUT"
}

# ---------------------------------------------------------------------------
# MALLOC_CHECK=1: allocations per request in steady state. A tiny LD_PRELOAD
# shim (ltrace is not available, and valgrind would distort timing) counts
# calls into a MAP_SHARED file, so the counters are read from bash with od at
# any moment — no signal handler to fight the server's own signal setup — and
# forked workers (nginx) add to the same counters.

build_malloc_shim() {
    cat >"$TMP/malloc_count.c" <<'EOF'
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* glibc's real allocator entry points: no dlsym, so no recursion at start. */
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void __libc_free(void *);

enum { C_MALLOC, C_CALLOC, C_REALLOC, C_MEMALIGN, C_FREE, C_N };
static _Atomic unsigned long early[C_N];           /* until the map exists */
static _Atomic unsigned long *ctr = early;
#define COUNT(i) atomic_fetch_add_explicit(&ctr[i], 1, memory_order_relaxed)

void *malloc(size_t n) { COUNT(C_MALLOC); return __libc_malloc(n); }
void *calloc(size_t a, size_t b) { COUNT(C_CALLOC); return __libc_calloc(a, b); }
void *realloc(void *p, size_t n) { COUNT(C_REALLOC); return __libc_realloc(p, n); }
void free(void *p) { if (p) COUNT(C_FREE); __libc_free(p); }
void *memalign(size_t a, size_t n) { COUNT(C_MEMALIGN); return __libc_memalign(a, n); }
void *aligned_alloc(size_t a, size_t n) { COUNT(C_MEMALIGN); return __libc_memalign(a, n); }
int posix_memalign(void **out, size_t a, size_t n) {
    COUNT(C_MEMALIGN);
    void *p = __libc_memalign(a, n);
    if (!p) return ENOMEM;
    *out = p;
    return 0;
}

__attribute__((constructor)) static void mc_init(void) {
    const char *path = getenv("MALLOC_COUNT_FILE");
    if (!path) return;
    int fd = open(path, O_RDWR | O_CREAT, 0600);
    if (fd < 0 || ftruncate(fd, sizeof early) != 0) return;
    void *m = mmap(NULL, sizeof early, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) return;
    _Atomic unsigned long *shared = m;
    for (int i = 0; i < C_N; i++) shared[i] = early[i];
    ctr = shared;
}

__attribute__((destructor)) static void mc_fini(void) {
    char buf[160];
    int n = snprintf(buf, sizeof buf, "malloc-count[%d]: malloc=%lu calloc=%lu realloc=%lu memalign=%lu free=%lu\n",
                     (int)getpid(), ctr[0], ctr[1], ctr[2], ctr[3], ctr[4]);
    if (n > 0) (void)!write(2, buf, (size_t)n);
}
EOF
    gcc -O2 -shared -fPIC -o "$TMP/malloc_count.so" "$TMP/malloc_count.c" ||
        die "could not build the malloc counting shim"
}

# read_malloc FILE -> "malloc calloc realloc memalign free"
read_malloc() { od -An -t u8 -N 40 -v "$1" | tr -s ' \n' ' ' | sed 's/^ //'; }

malloc_mode() {
    local name dir m0 m1 req c=10
    local -a a b
    build_malloc_shim
    select_proxies
    start_backend
    {
        echo "## allocations per request in steady state (wrk -c $c, 5 s after a 2 s warm-up, $WORKERS workers)"
        echo
        echo "| proxy | requests | malloc | calloc | realloc | memalign | allocations/req | free/req | allocations since start |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    } >"$TMP/malloc.md"
    for name in $PROXIES; do
        dir=$TMP/$name
        # Preload only into the proxy (not wrk): start it through env.
        PROXY_WRAP=(env LD_PRELOAD="$TMP/malloc_count.so" MALLOC_COUNT_FILE="$TMP/malloc-$name.cnt")
        if ! start_proxy "$name"; then
            echo "| $name | did not start: $(oneline "$START_ERR") | | | | | | | |" >>"$TMP/malloc.md"
            [[ -n ${PROXY_PID:-} ]] && stop_tree "$PROXY_PID"
            continue
        fi
        run_wrk "$PROXY_PORT" "$c" 2s "$TMP/malloc-warm.txt"
        m0=$(read_malloc "$TMP/malloc-$name.cnt")
        run_wrk "$PROXY_PORT" "$c" 5s "$TMP/malloc-$name.txt"
        m1=$(read_malloc "$TMP/malloc-$name.cnt")
        req=$(parse_wrk "$TMP/malloc-$name.txt" | awk '{ print $1 }')
        stop_tree "$PROXY_PID"
        read -ra a <<<"$m0"; read -ra b <<<"$m1"
        awk -v n="$req" -v name="$name" \
            -v d0=$((b[0] - a[0])) -v d1=$((b[1] - a[1])) -v d2=$((b[2] - a[2])) -v d3=$((b[3] - a[3])) -v d4=$((b[4] - a[4])) \
            -v all=$((b[0] + b[1] + b[2] + b[3])) \
            'BEGIN { printf "| %s | %d | %.2f | %.2f | %.2f | %.2f | **%.2f** | %.2f | %d |\n",
                     name, n, d0 / n, d1 / n, d2 / n, d3 / n, (d0 + d1 + d2 + d3) / n, d4 / n, all }' >>"$TMP/malloc.md"
    done
    PROXY_WRAP=()
    echo >>"$TMP/malloc.md"
    echo "Counted with an LD_PRELOAD shim over glibc's malloc family (the last column, never 0, shows the shim was loaded). LuaJIT's own allocator (mmap-backed) is not counted; HAProxy and nginx draw most memory from their own pools." >>"$TMP/malloc.md"
    tee "$OUT" <"$TMP/malloc.md"
}

# ---------------------------------------------------------------------------

STATUS=0
main() {
    command -v "$WRK" >/dev/null || die "wrk missing (scripts/deps.sh bench)"
    [[ -x $NGINX ]] || die "$NGINX missing (scripts/deps.sh bench)"
    # Every client and idle connection is a descriptor; take what the hard limit allows.
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    mkdir -p "$(dirname "$OUT")"
    if [[ $CALLGRIND == 1 ]]; then
        callgrind_mode
    elif [[ $MALLOC_CHECK == 1 ]]; then
        malloc_mode
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
