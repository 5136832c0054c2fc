# shellcheck shell=bash
# scripts/bench/callgrind.sh — CALLGRIND=1 (and HOOKS=1 CALLGRIND=1): instructions per
# request under callgrind, the exact figure; build/bench-callgrind.md.
# Sourced by scripts/bench.sh (after lib.sh and proxies.sh), never run: it defines
# functions and the state they share; bench.sh's main picks the mode.

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
        if [[ -n ${irq[moonproxy-base]:-} ]]; then
            echo "Same-run comparison of two builds: Ir/request moonproxy ÷ moonproxy-base ($BASELINE) =" \
                "**$(ratio "${irq[moonproxy]:-0}" "${irq[moonproxy-base]}" 3)** (${irq[moonproxy]:-–} ÷ ${irq[moonproxy-base]})."
            echo
        fi
        echo "Profiles kept in build/callgrind.out.$tag<proxy> (callgrind_annotate them)."
        echo
        cat "$TMP/cg-top.md"
    } | tee "$OUT"
}
