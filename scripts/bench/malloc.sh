# shellcheck shell=bash
# scripts/bench/malloc.sh — MALLOC_CHECK=1: malloc-family calls per request in steady
# state; build/bench-malloc.md.
# Sourced by scripts/bench.sh (after lib.sh and proxies.sh), never run: it defines
# functions and the state they share; bench.sh's main picks the mode.

# MALLOC_CHECK=1: allocations per request in steady state. A tiny LD_PRELOAD
# shim (ltrace is not available, and valgrind would distort timing) counts
# calls into a MAP_SHARED file, so the counters are read from bash with od at
# any moment — no signal handler to fight the server's own signal setup — and
# forked workers (nginx) add to the same counters.

# build_malloc_shim: the counter (malloc_count.c, next to this file) as a
# shared object in the temp dir.
build_malloc_shim() {
    gcc -O2 -shared -fPIC -o "$TMP/malloc_count.so" "$BENCH_DIR/malloc_count.c" ||
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
