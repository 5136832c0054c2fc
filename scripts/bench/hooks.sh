# shellcheck shell=bash
# scripts/bench/hooks.sh — HOOKS=1 (and the short version that ends the default run):
# what a Lua hook costs per request, next to nginx + lua-nginx-module; the table
# of build/bench-hooks.md.
# Sourced by scripts/bench.sh (after lib.sh and proxies.sh), never run: it defines
# functions and the state they share; bench.sh's main picks the mode.

# Sent by the hooks runs (wrk alone sends only Host, and a hook reading
# User-Agent would then find nothing); also by HOOKS=1 CALLGRIND=1.
HOOK_REQ_HEADERS=(
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
    "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    "Accept-Encoding: gzip, deflate, br"
    "Accept-Language: en-US,en;q=0.5"
)


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

# verdict RATIO TARGET: "met" or "missed" (RATIO <= TARGET).
verdict() { awk -v r="$1" -v t="$2" 'BEGIN { if (r == "–") print "not measured"; else if (r <= t) print "met"; else print "**missed**" }'; }

declare -A HOOK_LABEL=(
    [moonproxy]="moonproxy, no hook"
    [moonproxy-noop]="moonproxy, trivial hook"
    [moonproxy-hdr]="moonproxy, header hook"
    [nginx-lua]="nginx + lua, header hook"
    [nginx]="nginx, plain"
    [moonproxy-base]="moonproxy-base (BASELINE), no hook"
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
