#!/usr/bin/env bash
# scripts/bench_reload.sh [BIN] — how long a reload takes with a big script.
#
# Generates a configuration with 1,000 routes (600 prefix routes /svc/N/, 300
# exact paths /exact/N, 100 regex routes ^/r/N/(\d+)$, interleaved, all to one
# upstream) plus an admin port, starts moonproxy with WORKERS workers on it and
# measures:
#
#   1. POST /reload -> answer, RELOADS times. The admin port answers only once
#      every worker runs the new generation, so this is the whole reload as an
#      operator sees it. Two figures per reload: curl's own time_total (the
#      request alone) and the wall time around the curl process taken with
#      date +%s%N (adds curl's start-up, a few ms: what a deploy script sees).
#   2. SIGHUP -> the log line "reload: generation N loaded", HUPS times. The
#      log is followed by `tail -F` and read line by line as it comes (no
#      polling), but the line is written once the main thread has built every
#      worker's VM and handed it over, before the workers install it, and its
#      arrival goes through tail: coarser than 1.
#   3. Memory across a reload storm: VmRSS of the proxy before STORM reloads
#      in a row (POST /reload, one after the other), after the first 20 and
#      after all of them. Retired generations are freed when their last
#      request ends (here: at once, the proxy is idle), so RSS must stay flat.
#      Each storm reload is timed too: a reload that gets slower with the
#      generation number shows as first 20 vs last 20.
#   4. Where the time goes (same proxy, the script rewritten in place, then
#      POST /reload x RELOADS each): a 1-route script (the fixed cost of a
#      reload: new VMs, the DSL, the hand-over) and the 1,000-route script
#      run with the JIT off (jit.off() first, jit.on() last: the DSL's
#      functions, called 1,000 times, get traced, and every trace LuaJIT
#      commits costs two mprotect calls, each a TLB shootdown across the
#      proxy's threads).
#
# The single-VM cost of the script (moonproxy -t, one process start + one
# load) is printed too: a reload builds WORKERS+1 VMs one after the other on
# the main thread, so reload ≈ (WORKERS+1) × load when loading dominates.
#
# Results: stdout and build/bench-reload.md. Target: < 50 ms per reload.
#
# Environment:
#   WORKERS=2  RELOADS=20  HUPS=20  STORM=200
#   OUT=build/bench-reload.md   CURL=curl
#
# Every process started here (the proxy, tail) is stopped by PID on exit; the
# temp dir goes too. Only 127.0.0.1 is used.
set -Eeuo pipefail
trap 'log "bench_reload: failed at line $LINENO: $BASH_COMMAND"' ERR

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/build/moonproxy}
[[ $BIN == /* ]] || BIN=$PWD/$BIN
WORKERS=${WORKERS:-2}
RELOADS=${RELOADS:-20}
HUPS=${HUPS:-20}
STORM=${STORM:-200}
OUT=${OUT:-$ROOT/build/bench-reload.md}
CURL=${CURL:-curl}

TMP=$(mktemp -d "${TMPDIR:-/tmp}/moonproxy-bench-reload.XXXXXX")

log() { printf '%s\n' "$*" >&2; }

# die MESSAGE: print it with the end of the proxy's log (about to vanish
# with the temp dir) and exit; the EXIT trap stops what we started.
die() {
    log "bench_reload: $1"
    if [[ -s ${PROXY_LOG:-} ]]; then
        log "--- last lines of the proxy's log:"
        tail -n 20 "$PROXY_LOG" >&2
    fi
    exit 1
}

# ---------------------------------------------------------------------------
# Processes: recorded by PID, stopped on exit however we leave. Never by name.

declare -A STARTED=()

# stop_pid PID: SIGTERM, up to 5 s, then SIGKILL. moonproxy is one process
# (threads), tail too: no process tree to walk.
stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "bench_reload: pid $pid did not stop on SIGTERM, killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    unset "STARTED[$pid]"
}

# shellcheck disable=SC2317  # called from the EXIT trap
cleanup() {
    local p
    for p in "${!STARTED[@]}"; do stop_pid "$p"; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# free_port: below the ephemeral range, not listening, not handed out before.
declare -A PORTS_TAKEN=()
free_port() {
    local p i
    for ((i = 0; i < 200; i++)); do
        p=$((20000 + RANDOM % 12000))
        [[ -n ${PORTS_TAKEN[$p]:-} ]] && continue
        port_open "$p" && continue
        PORTS_TAKEN[$p]=1
        echo "$p"
        return 0
    done
    die "no free port found"
}

# now_ns: date +%s%N (what the brief asks for; a fork, ~1 ms, outside the
# timed request for curl's figure).
now_ns() { date +%s%N; }

# ms NS: nanoseconds as milliseconds with two decimals.
ms() { awk -v n="$1" 'BEGIN { printf "%.2f\n", n / 1e6 }'; }

# rss_kib PID: VmRSS of the proxy (all threads share it).
rss_kib() { awk '$1 == "VmRSS:" { print $2 }' "/proc/$1/status"; }

# stats FILE -> "min median max mean" of the numbers in FILE, one a line.
stats() {
    sort -g "$1" | awk '{ v[NR] = $1; s += $1 }
        END { m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
              printf "%.2f %.2f %.2f %.2f\n", v[1], m, v[NR], s / NR }'
}

# ---------------------------------------------------------------------------
# The configuration.

# write_config FILE LISTEN_PORT ADMIN_PORT UPSTREAM_PORT: 1,000 literal route
# declarations, the way a generated configuration looks (a Lua loop would
# hide the parser's share of the cost). Routes interleave: of every ten,
# six prefix routes, three exact paths, one regex.
write_config() {
    local f=$1 i k
    {
        cat <<EOF
-- generated by scripts/bench_reload.sh: 1,000 routes to one upstream
local proxy = require "moonproxy"
proxy.listen { addr = "127.0.0.1:$2" }
proxy.admin { addr = "127.0.0.1:$3" }
proxy.settings { workers = $WORKERS, access_log = false, shutdown_timeout = 2 }
local svc = proxy.upstream "svc" { servers = { "127.0.0.1:$4" }, keepalive = 16 }
EOF
        for ((i = 0; i < 1000; i++)); do
            k=$((i % 10))
            if ((k < 6)); then
                printf 'proxy.route { name = "svc-%d", prefix = "/svc/%d/", upstream = svc }\n' "$i" "$i"
            elif ((k < 9)); then
                printf 'proxy.route { name = "exact-%d", path = "/exact/%d", upstream = svc }\n' "$i" "$i"
            else
                printf 'proxy.route { name = "re-%d", regex = [[^/r/%d/(\\d+)$]], upstream = svc }\n' "$i" "$i"
            fi
        done
    } >"$f"
}

# ---------------------------------------------------------------------------
# The proxy and its admin port.

# http METHOD PORT PATH BODYFILE -> "status time_total_s" (curl's own timing).
http() {
    "$CURL" -s -m 10 -X "$1" -o "$4" -w '%{http_code} %{time_total}\n' "http://127.0.0.1:$2$3" ||
        echo "000 0"
}

start_proxy() {
    local i st
    "$BIN" -t -c "$CFG" >"$TMP/check.log" 2>&1 || die "moonproxy -t rejected the config: $(head -c 500 "$TMP/check.log")"
    PROXY_LOG=$TMP/proxy.log
    "$BIN" -c "$CFG" -w "$WORKERS" -l info >"$PROXY_LOG" 2>&1 </dev/null &
    PROXY_PID=$!
    STARTED[$PROXY_PID]=1
    # Ready = the admin says so (listeners accept, a configuration runs); 10 s.
    for ((i = 0; i < 100; i++)); do
        kill -0 "$PROXY_PID" 2>/dev/null || die "moonproxy exited during start-up"
        if port_open "$ADMIN_PORT"; then
            read -r st _ < <(http GET "$ADMIN_PORT" /ready /dev/null)
            [[ $st == 200 ]] && return 0
        fi
        sleep 0.1
    done
    die "moonproxy not ready within 10 s"
}

# post_reload -> sets RL_STATUS RL_GEN RL_CURL_NS RL_WALL_NS
post_reload() {
    local t0 t1 tt
    t0=$(now_ns)
    read -r RL_STATUS tt < <(http POST "$ADMIN_PORT" /reload "$TMP/reload.json")
    t1=$(now_ns)
    RL_WALL_NS=$((t1 - t0))
    RL_CURL_NS=$(awk -v s="$tt" 'BEGIN { printf "%.0f", s * 1e9 }')
    RL_GEN=$(sed -n 's/.*"generation":\([0-9]*\).*/\1/p' "$TMP/reload.json")
    [[ $RL_STATUS == 200 && -n $RL_GEN ]] ||
        die "POST /reload answered $RL_STATUS: $(head -c 300 "$TMP/reload.json")"
}

# configz_field NAME: a number from GET /configz ("generation"), or the
# number of routes for "routes".
configz_generation() {
    http GET "$ADMIN_PORT" /configz "$TMP/configz.json" >/dev/null
    sed -n 's/^{"generation":\([0-9]*\).*/\1/p' "$TMP/configz.json"
}
configz_routes() {
    http GET "$ADMIN_PORT" /configz "$TMP/configz.json" >/dev/null
    grep -o '"index":' "$TMP/configz.json" | wc -l
}

# ---------------------------------------------------------------------------
# Measurements.

# Routing still works: a regex route matches (502: the upstream is a closed
# port on purpose, nothing needs to run behind it) and an unknown path is 404.
check_routing() {
    local st
    read -r st _ < <(http GET "$LISTEN_PORT" /r/9/42 /dev/null)
    [[ $st == 502 ]] || die "GET /r/9/42 answered $st, expected 502 (route matched, upstream closed)"
    read -r st _ < <(http GET "$LISTEN_PORT" /exact/6 /dev/null)
    [[ $st == 502 ]] || die "GET /exact/6 answered $st, expected 502"
    read -r st _ < <(http GET "$LISTEN_PORT" /nowhere /dev/null)
    [[ $st == 404 ]] || die "GET /nowhere answered $st, expected 404"
}

# measure_posts NAME: RELOADS timed POST /reload into $TMP/post-NAME-{curl,wall}.txt.
measure_posts() {
    local i curl=$TMP/post-$1-curl.txt wall=$TMP/post-$1-wall.txt
    : >"$curl"
    : >"$wall"
    post_reload # a first one, not counted: page faults, lazily built tables
    for ((i = 0; i < RELOADS; i++)); do
        post_reload
        ms "$RL_CURL_NS" >>"$curl"
        ms "$RL_WALL_NS" >>"$wall"
    done
    log "POST /reload x $RELOADS ($1): curl time_total ms (min median max mean): $(stats "$curl")"
    log "    wall with curl's start-up: $(stats "$wall")"
}

# SIGHUP: `tail -F` follows the log into a coprocess; each reload reads its
# lines (bounded by read -t) until the one naming the expected generation.
measure_hups() {
    local i gen t0 t1 line found
    : >"$TMP/hup.txt"
    coproc TAILER { exec tail -n 0 -F "$PROXY_LOG" 2>/dev/null; }
    STARTED[$TAILER_PID]=1
    sleep 0.2 # tail must be following before the first signal
    gen=$(configz_generation)
    for ((i = 0; i < HUPS; i++)); do
        gen=$((gen + 1))
        found=0
        t0=$(now_ns)
        kill -HUP "$PROXY_PID"
        while IFS= read -r -t 10 line <&"${TAILER[0]}"; do
            if [[ $line == *"reload: generation $gen loaded"* ]]; then
                t1=$(now_ns)
                found=1
                break
            fi
            [[ $line == *"reload refused"* ]] && die "SIGHUP reload refused: $line"
        done
        ((found)) || die "no 'reload: generation $gen loaded' line within 10 s of SIGHUP"
        ms $((t1 - t0)) >>"$TMP/hup.txt"
        # The line is written before the workers install the generation and
        # nothing tells when they have: leave them 50 ms so that the next
        # signal finds an idle main thread (a pending hand-over would merely
        # be superseded, but the timing would then mix two reloads).
        sleep 0.05
    done
    stop_pid "$TAILER_PID"
    log "SIGHUP -> log line x $HUPS: ms (min median max mean): $(stats "$TMP/hup.txt")"
}

measure_storm() {
    local i g0 t0 t1
    RSS0=$(rss_kib "$PROXY_PID")
    g0=$(configz_generation)
    : >"$TMP/storm.txt"
    t0=$(now_ns)
    for ((i = 1; i <= STORM; i++)); do
        post_reload
        ms "$RL_CURL_NS" >>"$TMP/storm.txt"
        ((i == 20)) && RSS20=$(rss_kib "$PROXY_PID")
    done
    t1=$(now_ns)
    sleep 1 # retired generations are freed when drained; let any timer run
    RSS200=$(rss_kib "$PROXY_PID")
    STORM_MS=$(ms $((t1 - t0)))
    [[ $RL_GEN == $((g0 + STORM)) ]] || die "after $STORM reloads from generation $g0 the proxy runs $RL_GEN"
    head -n 20 "$TMP/storm.txt" >"$TMP/storm-first.txt"
    tail -n 20 "$TMP/storm.txt" >"$TMP/storm-last.txt"
    log "storm: $STORM reloads in $STORM_MS ms; RSS $RSS0 -> $RSS20 (after 20) -> $RSS200 KiB (after $STORM)"
    log "storm: curl ms (min median max mean) all: $(stats "$TMP/storm.txt"), first 20: $(stats "$TMP/storm-first.txt"), last 20: $(stats "$TMP/storm-last.txt")"
}

# measure_variants: the fixed cost and the JIT's share (see the header).
measure_variants() {
    local head
    head=$(sed -n '1,/^local svc/p' "$CFG")
    printf '%s\nproxy.route { name = "all", prefix = "/", upstream = svc }\n' "$head" >"$TMP/one.lua"
    { echo 'require("jit").off() -- bench_reload.sh: measuring the JIT share of a reload'
      cat "$CFG"
      echo 'require("jit").on()'; } >"$TMP/jitoff.lua"
    cp "$CFG" "$TMP/routes.orig.lua"
    cp "$TMP/one.lua" "$CFG"
    measure_posts one
    cp "$TMP/jitoff.lua" "$CFG"
    measure_posts jitoff
    cp "$TMP/routes.orig.lua" "$CFG"
    post_reload # back to the plain script for the last routing check
}

# The single-VM load: moonproxy -t (process start + one load + validation).
measure_check() {
    local i t0 t1
    : >"$TMP/check.txt"
    for ((i = 0; i < 5; i++)); do
        t0=$(now_ns)
        "$BIN" -t -c "$CFG" >/dev/null 2>&1 || die "moonproxy -t failed"
        t1=$(now_ns)
        ms $((t1 - t0)) >>"$TMP/check.txt"
    done
    log "moonproxy -t x 5: ms (min median max mean): $(stats "$TMP/check.txt")"
}

# row LABEL N FILE: a table row with the stats of FILE.
row() {
    local -a v
    read -r -a v <<<"$(stats "$3")"
    echo "| $1 | $2 | ${v[0]} | ${v[1]} | ${v[2]} | ${v[3]} |"
}

report() {
    echo "## moonproxy reload benchmark ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "$($BIN --version 2>/dev/null | head -n 1), $WORKERS workers, $(nproc) CPUs (shared)." \
        "Script: 1,000 routes (600 prefix, 300 exact, 100 regex), one upstream, admin port;" \
        "$(wc -c <"$CFG") bytes. Target: < 50 ms per reload."
    echo
    echo "| measure | n | min ms | median ms | max ms | mean ms |"
    echo "|---|---:|---:|---:|---:|---:|"
    row "**POST /reload → 200** (curl time_total; every worker runs the new generation)" "$RELOADS" "$TMP/post-main-curl.txt"
    row "same, wall time around curl (date +%s%N, includes curl's start-up)" "$RELOADS" "$TMP/post-main-wall.txt"
    row "SIGHUP → log \"reload: generation N loaded\" (via tail -F)" "$HUPS" "$TMP/hup.txt"
    row "storm: POST /reload, all (curl time_total)" "$STORM" "$TMP/storm.txt"
    row "storm: first 20" 20 "$TMP/storm-first.txt"
    row "storm: last 20" 20 "$TMP/storm-last.txt"
    row "where the time goes: POST /reload with a 1-route script (fixed cost)" "$RELOADS" "$TMP/post-one-curl.txt"
    row "where the time goes: POST /reload, 1,000 routes, script run with the JIT off" "$RELOADS" "$TMP/post-jitoff-curl.txt"
    row "moonproxy -t (process start + one VM load, reference)" 5 "$TMP/check.txt"
    echo
    echo "| RSS (VmRSS) | KiB |"
    echo "|---|---:|"
    echo "| before the storm | $RSS0 |"
    echo "| after 20 reloads | $RSS20 |"
    echo "| after $STORM reloads | $RSS200 |"
    echo
    echo "$STORM reloads back to back took $STORM_MS ms ($(awk -v t="$STORM_MS" -v n="$STORM" 'BEGIN { printf "%.2f", t / n }') ms each, curl start-up included)." \
        "Routing checked after the storm: /r/9/42 and /exact/6 matched (502 from the closed upstream port), /nowhere 404."
}

main() {
    [[ -x $BIN ]] || die "$BIN missing (make all)"
    command -v "$CURL" >/dev/null || die "curl missing"
    mkdir -p "$(dirname "$OUT")"
    LISTEN_PORT=$(free_port)
    ADMIN_PORT=$(free_port)
    UPSTREAM_PORT=$(free_port) # nothing listens there: routes need no backend to be timed
    CFG=$TMP/routes.lua
    write_config "$CFG" "$LISTEN_PORT" "$ADMIN_PORT" "$UPSTREAM_PORT"
    measure_check
    start_proxy
    log "moonproxy pid $PROXY_PID, $WORKERS workers, listening on $LISTEN_PORT, admin on $ADMIN_PORT"
    local n
    n=$(configz_routes)
    ((n == 1000)) || die "/configz lists $n routes, expected 1000"
    check_routing
    measure_posts main
    measure_hups
    measure_storm
    measure_variants
    check_routing
    report | tee "$OUT"
    log "written to $OUT"
}

main "$@"
