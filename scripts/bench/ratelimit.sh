#!/usr/bin/env bash
# scripts/bench/ratelimit.sh [BIN] — what rate_limit with policy = "redis"
# adds over counting in the process, with and without batch (issue 12, "Rate
# limits across a fleet").
#
# The fast backend of scripts/bench.sh (an nginx, 1 worker, "hello world\n"),
# a redis-server started here on loopback (persistence off), and moonproxy in
# front of the backend with one route through the plugin, in these
# configurations, all running at once on ports of their own and driven one
# after the other in rounds whose order rotates (load from other work on the
# shared machine then spreads over all of them):
#   none         no plugin
#   local        { "rate_limit", limit = 2^31, window = 3600 }: the shared dict
#   redis        the same with policy = "redis": one EVALSHA per request
#   redis-batch  the same with batch = BATCH: one EVALSHA per BATCH requests
#                per worker
# The limit is never reached (every answer is a 200; wrk's non-2xx count is
# the errors column) and every request has the one key 127.0.0.1: what is
# measured is the counting. ALGO=bucket counts with rate = 1e9, burst = 2^31.
# Per configuration: req/s, p50 and p99 latency (wrk --latency), the proxy's
# CPU µs per request and redis-server's (utime + stime over the requests).
# And the EVALSHA calls Redis served per request (INFO commandstats): 1 for
# redis, 1 / BATCH for redis-batch (proof that each counted in Redis).
#
# Environment:
#   WORKERS=1  CONNS=50  DURATION=5s  WARMUP=1s  ROUNDS=3  BATCH=100  ALGO=window
#   CONFIGS="none local redis redis-batch"
#   OUT=build/bench-ratelimit.md  NGINX=/usr/sbin/nginx  WRK=wrk  REDIS_SERVER=redis-server
# Dependencies: scripts/deps.sh bench (nginx, wrk), redis-server.
#
# Every process started here is stopped by PID on exit, and the temp dir goes.
set -Eeuo pipefail
BENCH_NAME=bench_ratelimit
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$BENCH_DIR/lib.sh"
# shellcheck source-path=SCRIPTDIR source=proxies.sh
. "$BENCH_DIR/proxies.sh"
trap 'log "bench_ratelimit: failed at line $LINENO: $BASH_COMMAND"' ERR

ROOT=$(cd "$BENCH_DIR/../.." && pwd)
BIN=${1:-$ROOT/build/moonproxy}
[[ $BIN == /* ]] || BIN=$PWD/$BIN
export MOONPROXY_LUA_PATH=${MOONPROXY_LUA_PATH:-$ROOT/lua}
WORKERS=${WORKERS:-1}
CONNS=${CONNS:-50}
DURATION=${DURATION:-5s}
WARMUP=${WARMUP:-1s}
ROUNDS=${ROUNDS:-3}
BATCH=${BATCH:-100}
ALGO=${ALGO:-window}
CONFIGS=${CONFIGS:-none local redis redis-batch}
OUT=${OUT:-$ROOT/build/bench-ratelimit.md}
NGINX=${NGINX:-/usr/sbin/nginx}
HAPROXY=${HAPROXY:-/usr/sbin/haproxy} # proxies.sh's versions() names it
WRK=${WRK:-wrk}
REDIS_SERVER=${REDIS_SERVER:-redis-server}
T_START=$(date +%s)

bench_tmpdir moonproxy-bench-ratelimit

die() {
    log "bench_ratelimit: $1"
    if [[ -n ${2:-} && -s $2 ]]; then
        log "--- last lines of $2:"
        tail -n 20 "$2" >&2
    fi
    exit 1
}

# redis_cmd ARGS...: one command over /dev/tcp (inline protocol), the reply's
# first line (an array's length, a bulk's length: enough for the checks here).
redis_cmd() {
    local fd line
    exec {fd}<>"/dev/tcp/127.0.0.1/$REDIS_PORT" || return 1
    printf '%s\r\n' "$*" >&"$fd"
    IFS= read -r -t 5 line <&"$fd" || true
    exec {fd}>&-
    printf '%s' "${line%$'\r'}"
}

# evalsha_calls: the EVALSHA calls Redis has served (INFO commandstats).
evalsha_calls() {
    local fd line n=0 i
    exec {fd}<>"/dev/tcp/127.0.0.1/$REDIS_PORT" || die "redis-server unreachable"
    printf 'INFO commandstats\r\n' >&"$fd"
    for ((i = 0; i < 200; i++)); do
        IFS= read -r -t 2 line <&"$fd" || break
        line=${line%$'\r'}
        if [[ $line =~ ^cmdstat_evalsha:calls=([0-9]+) ]]; then n=${BASH_REMATCH[1]}; fi
        [[ -z $line && $i -gt 1 ]] && break
    done
    exec {fd}>&-
    echo "$n"
}

start_redis() {
    local dir=$TMP/redis i
    mkdir -p "$dir"
    REDIS_PORT=$(free_port)
    start_bg "$dir/redis.log" "$REDIS_SERVER" --port "$REDIS_PORT" --bind 127.0.0.1 --save "" \
        --appendonly no --daemonize no --dir "$dir"
    REDIS_PID=$LAST_PID
    for ((i = 0; i < 100; i++)); do
        [[ $(redis_cmd PING 2>/dev/null) == +PONG ]] && return 0
        kill -0 "$REDIS_PID" 2>/dev/null || die "redis-server exited" "$dir/redis.log"
        sleep 0.1
    done
    die "redis-server did not answer on $REDIS_PORT within 10 s" "$dir/redis.log"
}

# plugin_opts NAME: the rate_limit options of a configuration ("" for none).
plugin_opts() {
    local count='limit = 2147483648, window = 3600'
    [[ $ALGO == bucket ]] && count='rate = 1e9, burst = 2147483648'
    case $1 in
    none) ;;
    local) echo "{ \"rate_limit\", $count, scope = \"bench-local\" }" ;;
    redis) echo "{ \"rate_limit\", $count, scope = \"bench-redis\", policy = \"redis\", redis = R }" ;;
    redis-batch) echo "{ \"rate_limit\", $count, scope = \"bench-batch\", policy = \"redis\", redis = R, batch = $BATCH }" ;;
    *) die "unknown configuration $1" ;;
    esac
}

declare -A CPID=() CPORT=() FAILED=()
declare -A ACC=()     # ACC[name] = "requests proxy_ticks redis_ticks evalsha_calls", summed over rounds
declare -A ROUNDL=()  # ROUNDL[name] = lines "rps p50 p99 errors"

start_config() {
    local name=$1 dir=$TMP/$1 port
    mkdir -p "$dir"
    port=$(free_port)
    cat >"$dir/cfg.lua" <<EOF
local proxy = require "moonproxy"
proxy.listen { addr = "127.0.0.1:$port" }
proxy.settings { workers = $WORKERS, access_log = false, shutdown_timeout = 2 }
local R = proxy.redis { addr = "127.0.0.1:$REDIS_PORT", timeout = 1, pool = 16 }
local b = proxy.upstream "b" { servers = { "127.0.0.1:$BACKEND_PORT" }, keepalive = 64 }
proxy.route { prefix = "/", upstream = b, plugins = { $(plugin_opts "$name") } }
EOF
    "$BIN" -t -c "$dir/cfg.lua" >"$dir/check.log" 2>&1 || {
        FAILED[$name]="moonproxy -t rejected the config: $(head -c 500 "$dir/check.log")"
        return 0
    }
    start_bg "$dir/stderr.log" "$BIN" -c "$dir/cfg.lua" -w "$WORKERS"
    CPID[$name]=$LAST_PID CPORT[$name]=$port
    if ! wait_port "$port" "$LAST_PID" "$name"; then
        FAILED[$name]=$START_ERR
        stop_tree "${CPID[$name]}"
        unset "CPID[$name]"
        return 0
    fi
    # one request must be a 200 (a plugin error would be a 500)
    local fd status=""
    exec {fd}<>"/dev/tcp/127.0.0.1/$port"
    printf 'GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n' >&"$fd"
    IFS= read -r -t 5 status <&"$fd" || true
    exec {fd}>&-
    if [[ $status != "HTTP/1.1 200"* ]]; then
        FAILED[$name]="check request: '${status%$'\r'}' ($(tail -n 3 "$dir/stderr.log" | tr '\n' ' '))"
        stop_tree "${CPID[$name]}"
        unset "CPID[$name]"
    fi
}

run_config() {
    local name=$1 wout=$TMP/wrk-$1.txt pids t0 t1 r0 r1 e0 e1 req rps p50 p99 err a_req a_t a_r a_e
    run_wrk "${CPORT[$name]}" "$CONNS" "$WARMUP" "$wout"
    pids=$(proc_tree "${CPID[$name]}")
    # shellcheck disable=SC2086
    t0=$(cpu_ticks $pids) r0=$(cpu_ticks "$REDIS_PID") e0=$(evalsha_calls)
    run_wrk "${CPORT[$name]}" "$CONNS" "$DURATION" "$wout"
    # shellcheck disable=SC2086
    t1=$(cpu_ticks $pids) r1=$(cpu_ticks "$REDIS_PID") e1=$(evalsha_calls)
    read -r req rps p50 _ p99 err < <(parse_wrk "$wout")
    ((req > 0)) || die "$name: wrk completed no request" "$wout"
    read -r a_req a_t a_r a_e <<<"${ACC[$name]:-0 0 0 0}"
    ACC[$name]="$((a_req + req)) $((a_t + t1 - t0)) $((a_r + r1 - r0)) $((a_e + e1 - e0))"
    ROUNDL[$name]+="$rps $p50 $p99 $err"$'\n'
    log "  $name: $rps req/s, p50 ${p50}us, p99 ${p99}us, errors $err"
}

median_col() {
    awk -v k="$1" 'NF { print $k }' <<<"$2" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR) print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
}

# per_req TICKS REQUESTS: µs of CPU per request.
per_req() { awk -v t="$1" -v hz="$CLK_TCK" -v n="$2" 'BEGIN { printf "%.2f", n ? t * 1e6 / hz / n : 0 }'; }

# config_figures NAME: "rps p50 p99 errors cpu redis_cpu evalsha_per_req" over all rounds.
config_figures() {
    local lines=${ROUNDL[$1]} req t r e
    read -r req t r e <<<"${ACC[$1]}"
    printf '%s %s %s %s %s %s %s\n' "$(awk 'NF { s += $1; n++ } END { printf "%.0f", s / n }' <<<"$lines")" \
        "$(median_col 2 "$lines")" "$(median_col 3 "$lines")" "$(awk 'NF { s += $4 } END { print s + 0 }' <<<"$lines")" \
        "$(per_req "$t" "$req")" "$(per_req "$r" "$req")" "$(awk -v e="$e" -v n="$req" 'BEGIN { printf "%.3f", e / n }')"
}

report() {
    local name rps p50 p99 err cpu rcpu calls b_p50="" b_cpu="" add_p50 add_cpu
    echo "## rate_limit: local vs policy = \"redis\" ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "Loopback, $(nproc) CPUs (shared), $WORKERS worker(s), wrk -c $CONNS -d $DURATION after a $WARMUP warm-up," \
        "$ROUNDS round(s) in rotating order; one route, one key (127.0.0.1), the limit never reached" \
        "($ALGO); Redis $("$REDIS_SERVER" --version | awk '{ print $3 }') on loopback; batch = $BATCH." \
        "CPU µs/req: utime + stime over all rounds' requests (the proxy's; redis-server's). req/s: mean over rounds; p50/p99: median."
    echo "Versions: $(versions)."
    echo
    echo "| configuration | req/s | p50 | p99 | p50 over local | proxy CPU µs/req | over local | redis-server CPU µs/req | EVALSHA per request | errors |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    [[ -n ${ACC[local]:-} ]] && read -r _ b_p50 _ _ b_cpu _ _ < <(config_figures local)
    for name in $CONFIGS; do
        if [[ -n ${FAILED[$name]:-} ]]; then
            echo "| $name | did not run: $(oneline "${FAILED[$name]}") | | | | | | | | |"
            continue
        fi
        [[ -n ${ACC[$name]:-} ]] || continue
        read -r rps p50 p99 err cpu rcpu calls < <(config_figures "$name")
        add_p50="" add_cpu=""
        if [[ -n $b_p50 && $name != local ]]; then
            add_p50=$(awk -v a="$p50" -v b="$b_p50" 'BEGIN { d = a - b; printf "%s%d µs", d < 0 ? "" : "+", d }')
            add_cpu=$(awk -v a="$cpu" -v b="$b_cpu" 'BEGIN { printf "%+.2f", a - b }')
        fi
        echo "| $name | $rps | $(fmt_us "$p50") | $(fmt_us "$p99") | $add_p50 | $cpu | $add_cpu | $rcpu | $calls | $err |"
    done
    echo
    echo "EVALSHA per request: the calls Redis served during the measured runs (INFO commandstats) over their requests."
    echo
    echo "Run time: $(($(date +%s) - T_START)) s."
}

main() {
    command -v "$WRK" >/dev/null || die "wrk missing (scripts/deps.sh bench)"
    command -v "$REDIS_SERVER" >/dev/null || die "redis-server missing (scripts/deps.sh)"
    [[ -x $NGINX ]] || die "$NGINX missing (scripts/deps.sh bench)"
    [[ -x $BIN ]] || die "$BIN missing (make)"
    [[ -x $HAPROXY ]] || HAPROXY=true
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    mkdir -p "$(dirname "$OUT")"
    MP_VERSION=$("$BIN" --version 2>/dev/null || true)
    MP_VERSION=${MP_VERSION%%$'\n'*}
    CLK_TCK=$(getconf CLK_TCK)
    start_backend
    start_redis
    local name r i n list=()
    for name in $CONFIGS; do
        log "starting $name"
        start_config "$name"
        [[ -n ${FAILED[$name]:-} ]] && log "  $name: ${FAILED[$name]}"
        [[ -n ${CPID[$name]:-} ]] && list+=("$name")
    done
    n=${#list[@]}
    ((n)) || die "no configuration could run"
    for ((r = 0; r < ROUNDS; r++)); do
        log "round $((r + 1)) of $ROUNDS"
        for ((i = 0; i < n; i++)); do run_config "${list[(i + r) % n]}"; done
    done
    for name in "${!CPID[@]}"; do stop_tree "${CPID[$name]}"; done
    report >"$TMP/report.md"
    cp "$TMP/report.md" "$OUT"
    cat "$TMP/report.md"
    log "written to $OUT"
}

main "$@"
