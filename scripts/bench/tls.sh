# shellcheck shell=bash
# scripts/bench/tls.sh — TLS=1: nginx, HAProxy and moonproxy terminating TLS in
# front of the same backend, with the same certificate (made here with the
# openssl command: RSA 2048 and ECDSA P-256, self-signed for 127.0.0.1), the
# same OpenSSL (Debian's libssl3 under all three) and the same worker count,
# measured in one run, at each of TLS_WORKERS (default "1 2": Debian's OpenSSL
# 3.0 contends on locks across threads, HAProxy issue #2454):
#   - keep-alive requests over TLS (wrk https://) at TLS_CONNS connections:
#     req/s, latency, the proxy's CPU µs per request (compare.sh's bench_proxy);
#   - new handshakes per second, full and resumed, for each key type:
#     TLS_HS_CLIENTS parallel `openssl s_time -www /` clients for TLS_HS_TIME
#     seconds each (-new: full; -reuse: every connection after the first offers
#     the session of the one before, so TLS 1.3 tickets are read), the
#     handshakes per second they got together, the proxy's CPU µs per
#     handshake (the steadier figure on a shared machine: it does not depend on
#     the clients' share of the CPU) and the share s_time saw resumed;
#   - idle memory per TLS connection: TLS_IDLE_CONNS idle keep-alive TLS
#     connections, each after one request (compare.sh's idle_memory with
#     scripts/idle_conns.lua in TLS mode), RSS delta / N.
# The keep-alive and idle parts use the ECDSA certificate. Results to stdout and
# build/bench-tls.md (OUT).
# Sourced by scripts/bench.sh (after lib.sh, proxies.sh and compare.sh), never
# run: it defines functions; bench.sh's main calls tls_mode when TLS=1.

TLS_WORKERS=${TLS_WORKERS:-1 2}
TLS_CONNS=${TLS_CONNS:-10 100}
TLS_KEYS=${TLS_KEYS:-ecdsa rsa}
TLS_HS_TIME=${TLS_HS_TIME:-5}
TLS_HS_CLIENTS=${TLS_HS_CLIENTS:-2}
TLS_IDLE_CONNS=${TLS_IDLE_CONNS:-2000}
OPENSSL=${OPENSSL:-openssl}

declare -A HS=()   # HS[proxy-wN:key:mode] = "handshakes per_s cpu_us_per_hs reused_pct"

# tls_certs: $TMP/tls/{rsa,ecdsa}.{pem,key}, self-signed for 127.0.0.1 and
# localhost (wrk and s_time do not verify; every proxy gets the same files).
tls_certs() {
    local d=$TMP/tls k
    mkdir -p "$d"
    for k in rsa ecdsa; do
        local alg=(-newkey rsa:2048)
        [[ $k == ecdsa ]] && alg=(-newkey ec -pkeyopt ec_paramgen_curve:P-256)
        "$OPENSSL" req -x509 "${alg[@]}" -nodes -sha256 -days 30 -subj /CN=127.0.0.1 \
            -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
            -keyout "$d/$k.key" -out "$d/$k.pem" >"$d/$k.log" 2>&1 || die "openssl req failed for $k" "$d/$k.log"
        cat "$d/$k.pem" "$d/$k.key" >"$d/$k.both.pem"    # HAProxy's crt: certificate and key in one file
    done
}

# tls_start_proxy NAME KEY WORKERS: NAME (nginx, haproxy, moonproxy) with a TLS
# listener using certificate KEY, WORKERS workers, in front of the backend;
# the configurations are proxies.sh's plain ones with TLS added to the
# listener. Sets PROXY_PID, PROXY_PORT, PROXY_LOG; 1 (START_ERR) on failure.
tls_start_proxy() {
    local name=$1 key=$2 workers=$3 dir=$TMP/tls-$1-$2-w$3
    local crt=$TMP/tls/$key.pem ckey=$TMP/tls/$key.key
    mkdir -p "$dir"
    PROXY_PORT=$(free_port)
    PROXY_LOG=$dir/stderr.log
    PROXY_PID=
    case $name in
    moonproxy)
        write_moonproxy_cfg "$dir/plain.lua" "$PROXY_PORT" "$workers"
        sed "s|^proxy.listen { addr = \"127.0.0.1:$PROXY_PORT\" }\$|proxy.listen { addr = \"127.0.0.1:$PROXY_PORT\", tls = { cert = \"$crt\", key = \"$ckey\" } }|" \
            "$dir/plain.lua" >"$dir/cfg.lua"
        grep -q 'tls = {' "$dir/cfg.lua" || { START_ERR="no listen line to add TLS to"; return 1; }
        "$BIN" -t -c "$dir/cfg.lua" >"$dir/check.log" 2>&1 || {
            START_ERR="moonproxy -t rejected the config: $(head -c 500 "$dir/check.log")"
            return 1
        }
        start_bg "$PROXY_LOG" "${PROXY_WRAP[@]}" "$BIN" -c "$dir/cfg.lua" -w "$workers"
        ;;
    nginx)
        {
            nginx_common "$dir" "${NGINX_MASTER:-on}"
            nginx_proxy_http "$dir" "$workers" "$PROXY_PORT" "        server 127.0.0.1:$BACKEND_PORT;"
        } | sed "s|^\( *listen 127.0.0.1:$PROXY_PORT .*reuseport\);\$|\1 ssl;\n        ssl_certificate $crt;\n        ssl_certificate_key $ckey;\n        ssl_protocols TLSv1.2 TLSv1.3;\n        ssl_session_cache shared:SSL:10m;|" \
            >"$dir/nginx.conf"
        grep -q 'ssl_certificate ' "$dir/nginx.conf" || { START_ERR="no listen line to add TLS to"; return 1; }
        PROXY_LOG=$dir/error.log
        start_nginx "$dir" "${PROXY_WRAP[@]}"
        ;;
    haproxy)
        {
            haproxy_common "$dir" "$workers" "$PROXY_PORT"
            echo "    server s1 127.0.0.1:$BACKEND_PORT"
        } | sed "s|^\( *bind 127.0.0.1:$PROXY_PORT\)\$|\1 ssl crt $TMP/tls/$key.both.pem alpn http/1.1 ssl-min-ver TLSv1.2|" \
            >"$dir/haproxy.cfg"
        grep -q ' ssl crt ' "$dir/haproxy.cfg" || { START_ERR="no bind line to add TLS to"; return 1; }
        start_bg "$PROXY_LOG" "${PROXY_WRAP[@]}" "$HAPROXY" -f "$dir/haproxy.cfg" -db
        ;;
    *) START_ERR="no TLS configuration for $name"; return 1 ;;
    esac
    PROXY_PID=$LAST_PID
    wait_port "$PROXY_PORT" "$PROXY_PID" "$name" "${PROXY_WAIT:-100}" || return 1
    # one real handshake and request before measuring: a listener that accepts
    # TCP but fails TLS must not be measured
    timeout 20 "$OPENSSL" s_time -connect "127.0.0.1:$PROXY_PORT" -new -time 1 -www / >"$dir/probe.log" 2>&1 || true
    if ! grep -q '^[1-9][0-9]* connections in .* real seconds' "$dir/probe.log"; then
        START_ERR="no TLS handshake: $(tail -n 5 "$dir/probe.log" | tr '\n' ' ')"
        return 1
    fi
}

# tls_handshakes LABEL MODE: MODE "new" (full) or "reuse" (resumed)
# handshakes against the running proxy, TLS_HS_CLIENTS s_time clients at once;
# to HS[LABEL:MODE].
tls_handshakes() {
    local label=$1 mode=$2 i pid pids t0 t1 w0 w1 n=0 r=0 c f
    local -a clients=()
    pids=$(proc_tree "$PROXY_PID")
    # shellcheck disable=SC2086
    t0=$(cpu_ticks $pids)
    w0=$(date +%s%N)
    for ((i = 0; i < TLS_HS_CLIENTS; i++)); do
        f=$TMP/stime-$label-$mode-$i.txt
        start_bg "$f" timeout $((TLS_HS_TIME + 30)) "$OPENSSL" s_time -connect "127.0.0.1:$PROXY_PORT" \
            "-$mode" -time "$TLS_HS_TIME" -www /
        clients+=("$LAST_PID")
    done
    for pid in "${clients[@]}"; do
        wait "$pid" || true
        unset "STARTED[$pid]"
    done
    w1=$(date +%s%N)
    # shellcheck disable=SC2086
    t1=$(cpu_ticks $pids)
    for ((i = 0; i < TLS_HS_CLIENTS; i++)); do
        f=$TMP/stime-$label-$mode-$i.txt
        c=$(awk '/ connections in .* real seconds/ { print $1; exit }' "$f")
        [[ -n $c ]] || die "$label: s_time -$mode gave no count" "$f"
        n=$((n + c))
        # the progress line: '*' a full handshake, 'r' a resumed one
        r=$((r + $(grep -E '^[*r]+$' "$f" | tr -cd 'r' | wc -c)))
    done
    ((n > 0)) || die "$label: no handshake with s_time -$mode" "$f"
    HS[$label:$mode]=$(awk -v n="$n" -v r="$r" -v w=$((w1 - w0)) -v t=$((t1 - t0)) -v hz="$CLK_TCK" \
        'BEGIN { printf "%d %.0f %.1f %.0f", n, n / (w / 1e9), t * 1e6 / hz / n, 100 * r / n }')
    log "  $label $mode: ${HS[$label:$mode]} (handshakes, per s, proxy CPU µs each, % resumed)"
}

# tls_one NAME WORKERS LABEL: every measurement of one proxy at one worker count.
tls_one() {
    local name=$1 workers=$2 label=$3 key
    for key in $TLS_KEYS; do
        log "$label: starting with the $key certificate"
        if ! tls_start_proxy "$name" "$key" "$workers"; then
            FAILED[$label]="did not start: $(oneline "$START_ERR")"
            log "$label: $START_ERR"
            [[ -s ${PROXY_LOG:-} ]] && tail -n 20 "$PROXY_LOG" >&2
            [[ -n ${PROXY_PID:-} ]] && stop_tree "$PROXY_PID"
            return 0
        fi
        tls_handshakes "$label:$key" new
        tls_handshakes "$label:$key" reuse
        if [[ $key == ecdsa ]]; then
            bench_proxy "$label"
            idle_memory "$label"
        fi
        stop_tree "$PROXY_PID"
    done
}

# tls_each FN ARGS...: FN ARGS... NAME WORKERS LABEL for every proxy at every worker count.
tls_each() {
    local w name
    for w in $TLS_WORKERS; do
        for name in $PROXIES; do "$@" "$name" "$w" "$name-w$w"; done
    done
}

# The rows of one proxy at one worker count: keep-alive, handshakes, idle memory.
tls_rows_keepalive() {
    local name=$1 w=$2 label=$3 c rps p50 p99 err cpu ncpu
    if [[ -n ${FAILED[$label]:-} ]]; then
        echo "| $name | $w | | ${FAILED[$label]} | | | | | |"
        return 0
    fi
    for c in $CONNS; do
        [[ -n ${RES[$label:$c]:-} ]] || continue
        read -r _ rps p50 p99 err cpu _ <<<"${RES[$label:$c]}"
        ncpu=$(awk '{ print $6 }' <<<"${RES[nginx-w$w:$c]:-}")
        echo "| $name | $w | $c | $rps | $(fmt_us "$p50") | $(fmt_us "$p99") | $cpu | $(ratio "$cpu" "$ncpu") | $err |"
    done
}

tls_rows_handshakes() {
    local name=$1 w=$2 label=$3 key frate fcpu rrate rcpu pct nfull nres
    [[ -n ${FAILED[$label]:-} ]] && return 0
    for key in $TLS_KEYS; do
        [[ -n ${HS[$label:$key:new]:-} && -n ${HS[$label:$key:reuse]:-} ]] || continue
        read -r _ frate fcpu _ <<<"${HS[$label:$key:new]}"
        read -r _ rrate rcpu pct <<<"${HS[$label:$key:reuse]}"
        read -r _ nfull _ <<<"${HS[nginx-w$w:$key:new]:-}"
        read -r _ nres _ <<<"${HS[nginx-w$w:$key:reuse]:-}"
        echo "| $name | $w | $key | $frate | $fcpu | $(ratio "$frate" "$nfull") | $rrate | $rcpu |" \
            "$(ratio "$rrate" "$nres") | $(ratio "$rrate" "$frate") | $pct% |"
    done
}

tls_rows_idle() {
    local name=$1 w=$2 label=$3 c r0 r1 held
    if [[ -n ${IDLE[$label]:-} ]]; then
        read -r c r0 r1 held <<<"${IDLE[$label]}"
        echo "- $name, $w workers: $c idle TLS connections ($held still open on the proxy's side): RSS $r0 KiB -> $r1 KiB, $(awk -v a="$r0" -v b="$r1" -v n="$c" 'BEGIN { printf "%.2f", (b - a) / n }') KiB per connection"
    elif [[ -n ${FAILED[$label:idle]:-} ]]; then
        echo "- $name, $w workers: ${FAILED[$label:idle]}"
    fi
}

tls_report() {
    echo "## moonproxy TLS benchmark ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "Loopback, $(nproc) CPUs (shared, noisy: compare rows of one run, not runs), workers: $TLS_WORKERS," \
        "backend: nginx with 1 worker returning \"hello world\". Same certificate files and the same" \
        "OpenSSL ($("$OPENSSL" version)) for every proxy; TLS 1.3 unless the client asks otherwise."
    echo "Versions: $(versions)."
    echo "Load average (1 min) at start: $LOAD0, at end: $(cut -d' ' -f1 /proc/loadavg)."
    echo
    echo "Keep-alive requests over TLS (ECDSA P-256 certificate; wrk https://, -d $DURATION after $WARMUP):"
    echo
    echo "| proxy | workers | conns | req/s | p50 | p99 | CPU µs/req | CPU/req vs nginx | errors |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    tls_each tls_rows_keepalive
    echo
    echo "New handshakes ($TLS_HS_CLIENTS parallel \`openssl s_time -www /\` clients, ${TLS_HS_TIME} s; one small request" \
        "each; full: -new, resumed: -reuse, TLS 1.3 tickets). Per s: all clients together (they share the CPUs" \
        "with the proxy); CPU µs: the proxy's per handshake; vs nginx: handshakes per s ÷ nginx's:"
    echo
    echo "| proxy | workers | key | full /s | full CPU µs | full vs nginx | resumed /s | resumed CPU µs | resumed vs nginx | resumed ÷ full | resumed seen |"
    echo "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    tls_each tls_rows_handshakes
    echo
    echo "Idle memory ($TLS_IDLE_CONNS idle keep-alive TLS connections, each after one request; RSS summed over the proxy's processes):"
    echo
    tls_each tls_rows_idle
}

tls_mode() {
    command -v "$OPENSSL" >/dev/null || die "openssl missing (scripts/deps.sh test)"
    # compare.sh's bench_proxy and idle_memory, over TLS
    # shellcheck disable=SC2034  # read by compare.sh and proxies.sh
    CONNS=$TLS_CONNS IDLE_CONNS=$TLS_IDLE_CONNS WRK_SCHEME=https
    export IDLE_CONNS_TLS=1                 # scripts/idle_conns.lua: TLS connections
    select_proxies
    LOAD0=$(cut -d' ' -f1 /proc/loadavg)
    tls_certs
    start_backend
    log "backend nginx on 127.0.0.1:$BACKEND_PORT"
    tls_each tls_one
    tls_report | tee "$OUT"
    log "written to $OUT"
    local p
    for p in "${!FAILED[@]}"; do [[ $p == *:* ]] || STATUS=1; done
}

# TLS=1 CALLGRIND=1: instructions per handshake, the exact figure (the
# handshake rates above depend on how much CPU the s_time clients get). Each
# proxy with one worker (nginx without its master) under callgrind, for each
# key: one `openssl s_time -www /` client, -new (full handshakes) then -reuse
# (resumed), TLS_CG_TIME seconds each after a 2 s warm-up; counters zeroed
# before and dumped after each (callgrind_control), so start-up is not
# counted. A handshake here includes its one small request.
TLS_CG_TIME=${TLS_CG_TIME:-8}

tls_callgrind_mode() {
    local name key mode dir dump ir n
    command -v callgrind_control >/dev/null || die "callgrind_control missing (scripts/deps.sh bench)"
    select_proxies
    tls_certs
    start_backend
    {
        echo "## instructions per TLS handshake under callgrind (1 worker, one s_time -www / client, ${TLS_CG_TIME} s per mode after a 2 s warm-up)"
        echo
        echo "| proxy | key | full: handshakes | Ir/handshake | vs nginx | resumed: handshakes | Ir/handshake | vs nginx |"
        echo "|---|---|---:|---:|---:|---:|---:|---:|"
    } >"$TMP/tls-cg.md"
    declare -A cg=()
    for key in $TLS_KEYS; do
        for name in $PROXIES; do
            dir=$TMP/tls-cg-$name-$key
            mkdir -p "$dir"
            PROXY_WRAP=(valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out.%p")
            PROXY_WAIT=600 NGINX_MASTER=off
            log "$name ($key): starting under callgrind"
            if ! tls_start_proxy "$name" "$key" 1; then
                log "$name: $START_ERR"
                [[ -n ${PROXY_PID:-} ]] && stop_tree "$PROXY_PID"
                continue
            fi
            for mode in new reuse; do
                timeout 60 "$OPENSSL" s_time -connect "127.0.0.1:$PROXY_PORT" "-$mode" -www / -time 2 >"$dir/warm-$mode.txt" 2>&1 || true
                rm -f "$dir"/callgrind.out.*.[0-9]*
                callgrind_control -z "$PROXY_PID" >>"$dir/vgdb.log" 2>&1 || die "callgrind_control -z failed" "$dir/vgdb.log"
                timeout $((TLS_CG_TIME + 60)) "$OPENSSL" s_time -connect "127.0.0.1:$PROXY_PORT" "-$mode" -www / \
                    -time "$TLS_CG_TIME" >"$dir/st-$mode.txt" 2>&1 || true
                callgrind_control -d "$PROXY_PID" >>"$dir/vgdb.log" 2>&1 || die "callgrind_control -d failed" "$dir/vgdb.log"
                n=$(awk '/ connections in .* real seconds/ { print $1; exit }' "$dir/st-$mode.txt")
                [[ -n $n && $n -gt 0 ]] || die "$name: s_time -$mode gave no count" "$dir/st-$mode.txt"
                dump=
                for ((i = 0; i < 50; i++)); do
                    dump=$(ls -t "$dir"/callgrind.out.*.[0-9]* 2>/dev/null | head -n 1)
                    [[ -s $dump ]] && break
                    sleep 0.1
                done
                [[ -s $dump ]] || die "$name: no callgrind dump in $dir"
                ir=$(awk '/^(summary|totals):/ { print $2; exit }' "$dump")
                cg[$name:$key:$mode]="$n $(awk -v a="$ir" -v n="$n" 'BEGIN { printf "%.0f", a / n }')"
                log "  $name $key $mode: ${cg[$name:$key:$mode]} (handshakes, Ir each)"
            done
            stop_tree "$PROXY_PID"
        done
        for name in $PROXIES; do
            [[ -n ${cg[$name:$key:new]:-} && -n ${cg[$name:$key:reuse]:-} ]] || continue
            read -r fn fi <<<"${cg[$name:$key:new]}"
            read -r rn ri <<<"${cg[$name:$key:reuse]}"
            echo "| $name | $key | $fn | $fi | $(ratio "$fi" "$(awk '{ print $2 }' <<<"${cg[nginx:$key:new]:-}")") | $rn | $ri |" \
                "$(ratio "$ri" "$(awk '{ print $2 }' <<<"${cg[nginx:$key:reuse]:-}")") |" >>"$TMP/tls-cg.md"
        done
    done
    PROXY_WRAP=() PROXY_WAIT="" NGINX_MASTER=""
    tee "$OUT" <"$TMP/tls-cg.md"
    log "written to $OUT"
}
