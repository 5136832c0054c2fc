#!/usr/bin/env bash
# scripts/bench/callout.sh [BIN] — what a hook that calls out costs per request
# (issue 12, "Speed"): a route whose request hook makes one HTTP call to an
# auth service before the request goes on, and one that makes one Redis INCR,
# next to nginx doing the same.
#
# One nginx backend (1 worker) is both the application ("/": "hello world\n")
# and the auth service ("/auth": 200 with X-User); one redis-server (no
# persistence) for the INCR rows. In front, one at a time, each with WORKERS
# workers and keep-alive both ways:
#   moonproxy-http     on_request: http.request { upstream = auth, path = "/auth" },
#                      then sets x-user from the answer
#   nginx-lua-http     access_by_lua_block: the same call over a cosocket
#                      (ngx.socket.tcp, a pooled keep-alive connection, a few
#                      lines: lua-resty-http is not in Debian)
#   nginx-auth-request auth_request to a location proxying /auth (keep-alive
#                      upstream), auth_request_set for x-user
#   moonproxy-redis    on_request: r:call("INCR", "hits")       (REDIS=0 leaves
#   nginx-lua-redis    access_by_lua_block: INCR over a cosocket   these out)
# each driven by wrk at CONNS connections for DURATION after a 1 s warm-up.
# CPU µs per request is the proxy process's (all its threads or workers) CPU
# time over the run divided by the requests: the steadiest figure on a shared
# machine; "of it user" is the part outside the kernel (on loopback the
# kernel's TCP work, the same for every proxy here, is most of it). Targets: moonproxy ≤ 0.8 × the nginx peer doing the same call.
#
# Environment: WORKERS=1 CONNS="10 100" DURATION=5s REDIS=1
#   OUT=build/bench-callout.md NGINX=/usr/sbin/nginx WRK=wrk REDIS_SERVER=redis-server
# Dependencies: scripts/deps.sh bench (nginx, libnginx-mod-http-lua, wrk, redis-server).
#
# Every process started here is stopped by PID on exit, and the temp dir goes.
set -Eeuo pipefail
BENCH_NAME=bench_callout
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$BENCH_DIR/lib.sh"
# shellcheck source-path=SCRIPTDIR source=proxies.sh
. "$BENCH_DIR/proxies.sh"
trap 'log "bench_callout: failed at line $LINENO: $BASH_COMMAND"' ERR

ROOT=$(cd "$BENCH_DIR/../.." && pwd)
BIN=${1:-$ROOT/build/moonproxy}
[[ $BIN == /* ]] || BIN=$PWD/$BIN
WORKERS=${WORKERS:-1}
CONNS=${CONNS:-10 100}
DURATION=${DURATION:-5s}
REDIS=${REDIS:-1}
OUT=${OUT:-$ROOT/build/bench-callout.md}
NGINX=${NGINX:-/usr/sbin/nginx}
WRK=${WRK:-wrk}
REDIS_SERVER=${REDIS_SERVER:-redis-server}
T_START=$(date +%s)
NAMES="moonproxy-http nginx-lua-http nginx-auth-request"
((REDIS)) && NAMES+=" moonproxy-redis nginx-lua-redis"

bench_tmpdir moonproxy-bench-callout

die() {
    log "bench_callout: $1"
    if [[ -n ${2:-} && -s $2 ]]; then
        log "--- last lines of $2:"
        tail -n 20 "$2" >&2
    fi
    exit 1
}

start_app() {
    local dir=$TMP/app
    mkdir -p "$dir"
    APP_PORT=$(free_port)
    {
        nginx_common "$dir"
        cat <<EOF
worker_processes 1;
events { worker_connections 4096; }
http {
$(nginx_http_common "$dir")
    server {
        listen 127.0.0.1:$APP_PORT backlog=4096;
        location = /auth { add_header X-User ann; return 200 "ok\n"; }
        location / { add_header X-User-Echo \$http_x_user; return 200 "hello world\n"; }
    }
}
EOF
    } >"$dir/nginx.conf"
    start_nginx "$dir"
    APP_PID=$LAST_PID
    wait_port "$APP_PORT" "$APP_PID" "backend nginx" || die "$START_ERR" "$dir/error.log"
}

start_redis() {
    REDIS_PORT=$(free_port)
    start_bg "$TMP/redis.log" "$REDIS_SERVER" --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no
    REDIS_PID=$LAST_PID
    wait_port "$REDIS_PORT" "$REDIS_PID" "redis-server" || die "$START_ERR" "$TMP/redis.log"
}

# The cosocket HTTP call nginx-lua-http makes: a status line, the fields up
# to the blank line, Content-Length bytes; the connection back to the pool.
NGX_HTTP_LUA='
            local s = ngx.socket.tcp()
            s:settimeout(1000)
            local ok, err = s:connect("127.0.0.1", APP)
            if not ok then return ngx.exit(503) end
            s:send("GET /auth HTTP/1.1\r\nHost: auth\r\n\r\n")
            local line = s:receive("*l")
            local status = line and tonumber(line:match("^HTTP/1%.%d (%d+)"))
            local len, user = 0, nil
            while true do
                local h = s:receive("*l")
                if not h then return ngx.exit(502) end
                if h == "" then break end
                local k, v = h:match("^([^:]+):%s*(.*)$")
                if k then
                    k = k:lower()
                    if k == "content-length" then len = tonumber(v) elseif k == "x-user" then user = v end
                end
            end
            if len > 0 then s:receive(len) end
            s:setkeepalive(60000, 64)
            if status ~= 200 then return ngx.exit(401) end
            ngx.req.set_header("x-user", user)'

NGX_REDIS_LUA='
            local s = ngx.socket.tcp()
            s:settimeout(1000)
            local ok, err = s:connect("127.0.0.1", REDIS)
            if not ok then return ngx.exit(503) end
            s:send("*2\r\n$4\r\nINCR\r\n$4\r\nhits\r\n")
            local line = s:receive("*l")
            if not line or line:sub(1, 1) ~= ":" then return ngx.exit(502) end
            s:setkeepalive(60000, 64)
            ngx.req.set_header("x-hits", line:sub(2))'

nginx_lua_cfg() { # DIR PORT LUA
    nginx_common "$1"
    nginx_lua_modules
    cat <<EOF
worker_processes $WORKERS;
events { worker_connections 10240; }
http {
$(nginx_http_common "$1")
    lua_socket_log_errors off;
    upstream b { server 127.0.0.1:$APP_PORT; keepalive 64; keepalive_requests 100000000; keepalive_timeout 300s; }
    server {
        listen 127.0.0.1:$2 backlog=4096 reuseport;
        location / {
            access_by_lua_block {${3//APP/$APP_PORT}
            }
            proxy_pass http://b;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
}

nginx_auth_cfg() { # DIR PORT
    nginx_common "$1"
    cat <<EOF
worker_processes $WORKERS;
events { worker_connections 10240; }
http {
$(nginx_http_common "$1")
    upstream b { server 127.0.0.1:$APP_PORT; keepalive 64; keepalive_requests 100000000; keepalive_timeout 300s; }
    server {
        listen 127.0.0.1:$2 backlog=4096 reuseport;
        location / {
            auth_request /_auth;
            auth_request_set \$user \$upstream_http_x_user;
            proxy_set_header X-User \$user;
            proxy_pass http://b;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
        location = /_auth {
            internal;
            proxy_pass http://b/auth;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
}

moonproxy_cfg() { # FILE PORT HOOK
    cat >"$1" <<EOF
local proxy = require "moonproxy"
local http = require "moonproxy.http"
proxy.listen { addr = "127.0.0.1:$2" }
proxy.settings { workers = $WORKERS, access_log = false, shutdown_timeout = 2 }
local app = proxy.upstream "app" { servers = { "127.0.0.1:$APP_PORT" }, keepalive = 64 }
local auth = proxy.upstream "auth" { servers = { "127.0.0.1:$APP_PORT" }, keepalive = 64 }
local r = proxy.redis { addr = "127.0.0.1:${REDIS_PORT:-6379}", pool = 64, timeout = 1 }
proxy.route { prefix = "/", upstream = app, on_request = function(req)
$3
end }
EOF
}

MP_HTTP_HOOK='  local res = http.request { upstream = auth, path = "/auth", timeout = 1 }
  if not res then return req:respond(503, "auth unavailable\n") end
  if res.status ~= 200 then return req:respond(401) end
  req.headers["x-user"] = res.headers["x-user"]'
MP_REDIS_HOOK='  local n = r:call("INCR", "hits")
  if not n then return req:respond(503, "redis unavailable\n") end
  req.headers["x-hits"] = tostring(n)'

# start_one NAME: PROXY_PID, PROXY_PORT; returns 1 with START_ERR.
start_one() {
    local name=$1 dir=$TMP/$1
    mkdir -p "$dir"
    PROXY_PORT=$(free_port)
    case $name in
    moonproxy-http | moonproxy-redis)
        local hook=$MP_HTTP_HOOK
        [[ $name == moonproxy-redis ]] && hook=$MP_REDIS_HOOK
        moonproxy_cfg "$dir/cfg.lua" "$PROXY_PORT" "$hook"
        "$BIN" -t -c "$dir/cfg.lua" >"$dir/check.log" 2>&1 || {
            START_ERR="moonproxy -t rejected the config: $(head -c 500 "$dir/check.log")"
            return 1
        }
        start_bg "$dir/stderr.log" "$BIN" -c "$dir/cfg.lua" -w "$WORKERS"
        ;;
    nginx-lua-http) nginx_lua_cfg "$dir" "$PROXY_PORT" "$NGX_HTTP_LUA" >"$dir/nginx.conf" && start_nginx "$dir" ;;
    nginx-lua-redis) nginx_lua_cfg "$dir" "$PROXY_PORT" "${NGX_REDIS_LUA//REDIS/$REDIS_PORT}" >"$dir/nginx.conf" && start_nginx "$dir" ;;
    nginx-auth-request) nginx_auth_cfg "$dir" "$PROXY_PORT" >"$dir/nginx.conf" && start_nginx "$dir" ;;
    esac
    PROXY_PID=$LAST_PID
    wait_port "$PROXY_PORT" "$PROXY_PID" "$name" 100
}

# check_one NAME PORT: one request must reach the app through the call.
check_one() {
    local out
    out=$(curl -s -m 5 -D - -o /dev/null "http://127.0.0.1:$2/" || true)
    [[ $out == *" 200 "* ]] || { START_ERR="a request through $1 did not get 200: $(oneline "$out")"; return 1; }
}

declare -A RES=() FAILED=()   # RES[name:conns] = "cpu_us rps p50 p99 errors user_us"

run_one() {
    local name=$1 c t0 t1 u0 u1 wout req rps p50 p99 err tick
    log "$name: starting"
    if ! start_one "$name" || ! check_one "$name" "$PROXY_PORT"; then
        FAILED[$name]=$START_ERR
        log "  $name: $START_ERR"
        [[ -n ${PROXY_PID:-} ]] && stop_tree "$PROXY_PID"
        return 0
    fi
    tick=$(getconf CLK_TCK)
    for c in $CONNS; do
        wout=$TMP/wrk-$name-$c.txt
        run_wrk "$PROXY_PORT" "$c" 1s "$wout"   # warm-up: pools filled, traces compiled
        # shellcheck disable=SC2046
        t0=$(cpu_ticks $(proc_tree "$PROXY_PID")) u0=$(user_ticks $(proc_tree "$PROXY_PID"))
        run_wrk "$PROXY_PORT" "$c" "$DURATION" "$wout"
        # shellcheck disable=SC2046
        t1=$(cpu_ticks $(proc_tree "$PROXY_PID")) u1=$(user_ticks $(proc_tree "$PROXY_PID"))
        read -r req rps p50 _ p99 err < <(parse_wrk "$wout")
        ((req > 0)) || { FAILED[$name]="wrk completed no request"; break; }
        RES[$name:$c]="$(awk -v t=$((t1 - t0)) -v k="$tick" -v r="$req" 'BEGIN { printf "%.1f", 1e6 * t / k / r }') $rps $p50 $p99 $err $(awk -v t=$((u1 - u0)) -v k="$tick" -v r="$req" 'BEGIN { printf "%.1f", 1e6 * t / k / r }')"
        log "  $name c=$c: ${RES[$name:$c]}"
    done
    stop_tree "$PROXY_PID"
}

row_ratio() { # MINE PEER CONNS
    local a=${RES[$1:$3]:-} b=${RES[$2:$3]:-}
    [[ -n $a && -n $b ]] || { echo "–"; return; }
    ratio "${a%% *}" "${b%% *}" 2
}

report() {
    local name c cpu rps p50 p99 err user
    echo "## Hooks that call out ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "Loopback, $(nproc) CPUs (shared), $WORKERS worker(s) per proxy, wrk for $DURATION after a 1 s warm-up;" \
        "every request makes one call before it is proxied (keep-alive both ways). CPU: the proxy process's, µs per request."
    echo "Versions: $("$NGINX" -v 2>&1 | sed 's/.*: //'), $("$BIN" --version 2>/dev/null | head -n 1)$( ((REDIS)) && echo ", $("$REDIS_SERVER" --version | awk '{ print $1, $2, $3 }')")."
    echo
    echo "| proxy | conns | CPU µs/req | of it user | req/s | p50 µs | p99 µs | errors |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    for name in $NAMES; do
        if [[ -n ${FAILED[$name]:-} ]]; then
            echo "| $name | | did not run: $(oneline "${FAILED[$name]}") | | | | | |"
            continue
        fi
        for c in $CONNS; do
            [[ -n ${RES[$name:$c]:-} ]] || continue
            read -r cpu rps p50 p99 err user <<<"${RES[$name:$c]}"
            echo "| $name | $c | $cpu | $user | $rps | $p50 | $p99 | $err |"
        done
    done
    echo
    for c in $CONNS; do
        echo "- $c conns: moonproxy-http ÷ nginx-lua-http **$(row_ratio moonproxy-http nginx-lua-http "$c")**," \
            "÷ nginx-auth-request **$(row_ratio moonproxy-http nginx-auth-request "$c")**$( ((REDIS)) &&
                echo "; moonproxy-redis ÷ nginx-lua-redis **$(row_ratio moonproxy-redis nginx-lua-redis "$c")**")" \
            "(CPU per request; target ≤ 0.8)."
    done
    echo
    echo "Run time: $(($(date +%s) - T_START)) s."
}

main() {
    command -v "$WRK" >/dev/null || die "wrk missing (scripts/deps.sh bench)"
    [[ -x $NGINX ]] || die "$NGINX missing (scripts/deps.sh bench)"
    ((REDIS == 0)) || command -v "$REDIS_SERVER" >/dev/null || die "redis-server missing (scripts/deps.sh bench)"
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    mkdir -p "$(dirname "$OUT")"
    start_app
    ((REDIS)) && start_redis
    local name
    for name in $NAMES; do run_one "$name"; done
    report >"$TMP/report.md"
    cp "$TMP/report.md" "$OUT"
    cat "$TMP/report.md"
    log "written to $OUT"
}

main "$@"
