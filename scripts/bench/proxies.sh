# shellcheck shell=bash
# scripts/bench/proxies.sh — what every mode of scripts/bench.sh shares: wrk runs, the
# backend, the proxies (nginx, HAProxy, moonproxy and its hook configurations,
# moonproxy-base), which of them can run, their versions.
# Sourced by scripts/bench.sh (after lib.sh and proxies.sh), never run: it defines
# functions and the state they share; bench.sh's main picks the mode.

# ---------------------------------------------------------------------------
# wrk.

# Extra wrk arguments for every run: BODY=chunked adds its request script
# (chunked.sh), the hooks runs a browser's usual request headers (hooks.sh).
WRK_ARGS=()

# run_wrk PORT CONNS DURATION OUTFILE: wrk needs threads <= connections.
# WRK_SCHEME=https: over TLS (tls.sh).
run_wrk() {
    local port=$1 c=$2 d=$3 outf=$4 t=2
    ((c < t)) && t=$c
    "$WRK" -t "$t" -c "$c" -d "$d" --latency "${WRK_ARGS[@]}" "${WRK_SCHEME:-http}://127.0.0.1:$port/" >"$outf" 2>&1 ||
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
    moonproxy | moonproxy-noop | moonproxy-hdr | moonproxy-base)
        # moonproxy-base: the BASELINE binary with moonproxy's (hookless) config.
        local bin=$BIN hook=${name#moonproxy}
        [[ $name == moonproxy-base ]] && bin=$BASELINE hook=""
        write_moonproxy_cfg "$dir/cfg.lua" "$PROXY_PORT" "$workers" "$hook"
        # -t first: a config error then reads as one clear line.
        "$bin" -t -c "$dir/cfg.lua" >"$dir/check.log" 2>&1 || {
            START_ERR="moonproxy -t rejected the config: $(head -c 500 "$dir/check.log")"
            return 1
        }
        start_bg "$PROXY_LOG" "${PROXY_WRAP[@]}" "$bin" -c "$dir/cfg.lua" -w "$workers"
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
            nginx_proxy_http "$dir" "$workers" "$PROXY_PORT" "        server 127.0.0.1:$BACKEND_PORT;" "$lua_access"
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

# versions: one line. Whole outputs are captured first: "head -n 1" on a
# pipe would SIGPIPE the tool and fail the pipeline (wrk -v also exits 1).
versions() {
    local n h w
    n=$("$NGINX" -v 2>&1 || true)
    h=$("$HAPROXY" -v 2>/dev/null || true)
    w=$("$WRK" -v 2>&1 || true)
    h=${h%%$'\n'*} w=${w%%$'\n'*}
    printf '%s, %s, %s%s' "${n##*: }" "$(awk '{ print $1, $3 }' <<<"$h")" \
        "$(awk '{ print $1, $2 }' <<<"$w")" "${MP_VERSION:+, $MP_VERSION}${MP_BASE_VERSION:+, $MP_BASE_VERSION}"
}

# available NAMES...: those that can run, space-separated: the moonproxy
# configurations only if the binary is built (the server may not exist yet).
available() {
    local p
    for p in "$@"; do
        if [[ $p == moonproxy* ]]; then
            if [[ ${SKIP_MOONPROXY:-0} == 1 ]]; then log "$p: skipped (SKIP_MOONPROXY=1)"; continue; fi
            if [[ $p == moonproxy-base ]]; then
                if [[ ! -x ${BASELINE:-} ]]; then log "$p: no baseline binary (BASELINE=${BASELINE:-})"; continue; fi
            elif [[ ! -x $BIN ]]; then log "$p: not built ($BIN missing)"; continue; fi
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
    if [[ " $PROXIES " == *" moonproxy-base "* ]]; then
        MP_BASE_VERSION=$("$BASELINE" --version 2>/dev/null || true)
        MP_BASE_VERSION="moonproxy-base: ${MP_BASE_VERSION%%$'\n'*} ($BASELINE)"
    fi
}

# ratio A B [DECIMALS]: A / B with two decimals (or DECIMALS), "–" if either is missing.
ratio() { awk -v a="$1" -v b="$2" -v d="${3:-2}" 'BEGIN { if (a > 0 && b > 0) printf "%." d "f", a / b; else print "–" }'; }

