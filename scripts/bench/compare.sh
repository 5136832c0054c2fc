# shellcheck shell=bash
# scripts/bench/compare.sh — the default run: every proxy in turn in front of the same
# backend, wrk at each of CONNS, then IDLE_CONNS idle keep-alive connections and
# the RSS they cost; the table of build/bench-results.md (and, with BODY=chunked,
# of build/bench-chunked.md).
# Sourced by scripts/bench.sh (after lib.sh and proxies.sh), never run: it defines
# functions and the state they share; bench.sh's main picks the mode.

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
    : >"$outf"                                   # start_bg's child may open it after our first look
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
    baseline_report
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

# baseline_report: with BASELINE, the new build against the old one, measured in
# this run: CPU µs/request of moonproxy ÷ moonproxy-base at each connection count
# (three decimals: the figure a "within 3%" target is read from).
baseline_report() {
    local c new old
    [[ " $PROXIES " == *" moonproxy-base "* ]] || return 0
    echo
    echo "Same-run comparison of two builds: moonproxy ($BIN) and moonproxy-base ($BASELINE)," \
        "same config, same Lua directory, measured one after the other:"
    echo
    for c in $CONNS; do
        new=$(awk '{ print $6 }' <<<"${RES[moonproxy:$c]:-}") old=$(awk '{ print $6 }' <<<"${RES[moonproxy-base:$c]:-}")
        echo "- $c connections: CPU µs/request moonproxy ÷ moonproxy-base = **$(ratio "$new" "$old" 3)** (${new:-–} ÷ ${old:-–})"
    done
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
