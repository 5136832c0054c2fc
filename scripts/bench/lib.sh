# shellcheck shell=bash
# scripts/bench/lib.sh — helpers shared by scripts/bench.sh (and its modes in
# scripts/bench/), scripts/bench/reload.sh and scripts/bench/tail.sh. Sourced,
# never run: `. "$(dirname "$0")/lib.sh"` (bench.sh: `. "$BENCH_DIR/lib.sh"`).
#
# The sourcing script sets BENCH_NAME (the prefix of its messages) before
# sourcing, and defines die MESSAGE [LOGFILE] (print, exit 1: each script
# shows a different log with it). bench_tmpdir creates $TMP and installs the
# EXIT/INT/TERM traps. Nothing here is run at source time but assignments.

# ---------------------------------------------------------------------------
# Logging.

log() { printf '%s\n' "$*" >&2; }

# oneline TEXT: on one line and at most ONELINE_MAX characters, for a table cell.
ONELINE_MAX=300
oneline() {
    local t=${1//$'\n'/ }
    t=${t//|/\\|}
    ((${#t} > ONELINE_MAX)) && t="${t:0:ONELINE_MAX}…"
    printf '%s' "$t"
}

# fmt_us MICROSECONDS: "812 µs", "1.25 ms", "2.00 s".
fmt_us() {
    awk -v u="$1" 'BEGIN {
        if (u < 1000) printf "%d µs", u
        else if (u < 1000000) printf "%.2f ms", u / 1000
        else printf "%.2f s", u / 1000000 }'
}

# ---------------------------------------------------------------------------
# Processes: every PID we start is recorded, and stopped on exit however we
# leave (error, ^C). Never by name: the machine is shared.

declare -A STARTED=()
LAST_PID=

# start_bg LOGFILE CMD...: start CMD in the background, output to LOGFILE;
# its PID goes to LAST_PID (not echoed: a $(...) would make it a grandchild).
start_bg() {
    local logf=$1; shift
    "$@" >"$logf" 2>&1 </dev/null &
    LAST_PID=$!
    STARTED[$LAST_PID]=1
}

# proc_tree PID: PID and all its descendants (nginx = master + workers), read
# from /proc without forking once per process.
proc_tree() {
    local f line pid ppid rest
    local -A kids=()
    for f in /proc/[0-9]*/stat; do
        { read -r line <"$f"; } 2>/dev/null || continue   # it may just have exited
        pid=${line%% *}
        rest=${line##*) }               # comm may hold spaces: skip past ')'
        read -r _ ppid _ <<<"$rest"
        kids[$ppid]+=" $pid"
    done
    local -a queue=("$1")
    local out=""
    while ((${#queue[@]})); do
        pid=${queue[0]}; queue=("${queue[@]:1}")
        [[ -d /proc/$pid ]] || continue
        out+=" $pid"
        # shellcheck disable=SC2206
        [[ -n ${kids[$pid]:-} ]] && queue+=(${kids[$pid]})
    done
    echo "$out"
}

# alive PID: exists and is not a zombie.
alive() {
    local line
    { read -r line <"/proc/$1/stat"; } 2>/dev/null || return 1
    line=${line##*) }
    [[ ${line:0:1} != Z ]]
}

# stop_tree PID: SIGTERM the process, give it (and its children) 5 s, then
# SIGKILL whatever of that tree is left, by PID.
stop_tree() {
    local root=$1 p i left="" tree
    tree=$(proc_tree "$root")
    kill -TERM "$root" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        left=""
        for p in $tree; do alive "$p" && left+=" $p"; done
        [[ -z $left ]] && break
        sleep 0.1
    done
    for p in $left; do
        log "$BENCH_NAME: pid $p did not stop on SIGTERM, killing it"
        kill -KILL "$p" 2>/dev/null || true
    done
    wait "$root" 2>/dev/null || true
    unset "STARTED[$root]"
}

# shellcheck disable=SC2317  # called from the EXIT trap
cleanup() {
    local p
    for p in "${!STARTED[@]}"; do stop_tree "$p"; done
    rm -rf "$TMP"
}

# bench_tmpdir PREFIX: TMP=a new temp dir; from now on, leaving stops every
# recorded process and removes it.
bench_tmpdir() {
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
    trap cleanup EXIT
    trap 'exit 130' INT TERM
}

# ---------------------------------------------------------------------------
# Ports, probed with bash's /dev/tcp (no curl/nc needed).

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

declare -A PORTS_TAKEN=()
# A free port below the ephemeral range (32768+), so wrk's and the proxies'
# own outgoing connections can't collide with it.
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

# wait_port PORT PID NAME [TENTHS]: poll until PORT accepts; fail fast (1,
# START_ERR set) if PID died, and give up after TENTHS/10 s (default 10 s).
wait_port() {
    local port=$1 pid=$2 name=$3 limit=${4:-100} i
    for ((i = 0; i < limit; i++)); do
        kill -0 "$pid" 2>/dev/null || { START_ERR="$name exited during start-up"; return 1; }
        port_open "$port" && return 0
        sleep 0.1
    done
    # shellcheck disable=SC2034  # read by the caller
    START_ERR="$name did not listen on 127.0.0.1:$port within $((limit / 10)) s"
    return 1
}

# ---------------------------------------------------------------------------
# Measurements from /proc.

# proc_ticks STIME PIDS...: utime (+ stime if STIME is 1) summed over PIDS,
# fields 14 and 15 of /proc/PID/stat, in clock ticks; for a threaded process
# they include every thread.
proc_ticks() {
    local with_stime=$1 p line sum=0
    local -a fields
    shift
    for p in "$@"; do
        { read -r line <"/proc/$p/stat"; } 2>/dev/null || continue
        line=${line##*) }                 # fields from 3 (state) on
        read -ra fields <<<"$line"
        sum=$((sum + fields[11] + with_stime * fields[12]))
    done
    echo "$sum"
}

# cpu_ticks PIDS...: utime+stime.
cpu_ticks() { proc_ticks 1 "$@"; }

# user_ticks PIDS...: utime alone.
user_ticks() { proc_ticks 0 "$@"; }

# rss_kib PIDS...: sum of VmRSS (KiB). Shared pages of nginx's master and
# workers are counted in each, but only differences are ever used.
rss_kib() {
    local p k v sum=0
    for p in "$@"; do
        { while read -r k v _; do
            [[ $k == VmRSS: ]] && sum=$((sum + v))
        done <"/proc/$p/status"; } 2>/dev/null || true
    done
    echo "$sum"
}

# ---------------------------------------------------------------------------
# wrk.

# parse_wrk FILE -> "requests req/s p50_us p90_us p99_us errors"
parse_wrk() {
    awk '
    function us(v,   n, u) {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "ms") return n * 1000
        if (u == "s")  return n * 1000000
        if (u == "m")  return n * 60000000
        return n                                  # "us"
    }
    /^ *50% /           { p50 = us($2) }
    /^ *90% /           { p90 = us($2) }
    /^ *99% /           { p99 = us($2) }
    / requests in /     { req = $1 }
    /^Requests\/sec:/   { rps = $2 }
    /Socket errors:/    { gsub(/,/, ""); err += $4 + $6 + $8 + $10 }
    /Non-2xx or 3xx/    { err += $NF }
    END { printf "%d %.0f %.0f %.0f %.0f %d\n", req, rps, p50, p90, p99, err }
    ' "$1"
}

# ---------------------------------------------------------------------------
# nginx (backends, and nginx as a proxy).

# stub_status PORT FIELD: a counter of an nginx's stub_status on PORT, over a
# raw HTTP/1.0 request on /dev/tcp; FIELD 1 = accepts, 2 = handled,
# 3 = requests. The query itself is one accept and one request.
stub_status() {
    local fd line n=""
    exec {fd}<>"/dev/tcp/127.0.0.1/$1" || die "backend stub_status unreachable"
    printf 'GET /nginx_status HTTP/1.0\r\nHost: backend\r\n\r\n' >&"$fd"
    while IFS= read -r -t 5 line <&"$fd"; do
        line=${line%$'\r'}
        if [[ $line =~ ^\ *([0-9]+)\ +([0-9]+)\ +([0-9]+)\ *$ ]]; then n=${BASH_REMATCH[$2]}; fi
    done
    exec {fd}>&-
    [[ -n $n ]] || die "could not read the backend's stub_status"
    echo "$n"
}

# As root, nginx would switch its workers to "nobody"; keep the current user.
NGINX_USER_LINE=""
if [[ $(id -u) == 0 ]]; then NGINX_USER_LINE="user $(id -un) $(id -gn);"; fi

# nginx_common DIR [MASTER]: directives every nginx here needs: its own
# prefix, pid and temp dirs inside the temp dir, in the foreground, quiet.
nginx_common() {
    local dir=$1
    cat <<EOF
$NGINX_USER_LINE
daemon off;
master_process ${2:-on};
pid $dir/nginx.pid;
error_log $dir/error.log warn;
worker_rlimit_nofile 20000;
EOF
}

# nginx_http_common DIR: the same, inside http { }.
nginx_http_common() {
    local dir=$1
    cat <<EOF
    access_log off;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    # nginx closes a keep-alive connection after 1000 requests by default:
    # the backend would make every proxy reconnect upstream that often, and
    # the nginx proxy would make wrk reconnect. Lift it so that "upstream
    # conns opened" shows the proxies' pooling only.
    keepalive_requests 100000000;
    keepalive_timeout 300s;
EOF
}

# nginx_lua_modules: the load_module lines for lua-nginx-module (Debian's
# libnginx-mod-http-lua) and the NDK it needs first, by absolute path (our
# nginx prefix is the temp dir). Fails with a message if they are missing.
nginx_lua_modules() {
    local d
    for d in /usr/lib/nginx/modules /usr/share/nginx/modules; do
        if [[ -f $d/ngx_http_lua_module.so && -f $d/ndk_http_module.so ]]; then
            printf 'load_module %s;\nload_module %s;\n' "$d/ndk_http_module.so" "$d/ngx_http_lua_module.so"
            return 0
        fi
    done
    echo "ngx_http_lua_module.so not found (apt-get install libnginx-mod-http-lua)"
    return 1
}

# start_nginx DIR [WRAPPER...]: nginx on DIR/nginx.conf (prefix DIR, errors
# to DIR/error.log, its own output to DIR/stderr.log); PID in LAST_PID.
start_nginx() {
    local dir=$1; shift
    start_bg "$dir/stderr.log" "$@" "$NGINX" -p "$dir/" -c "$dir/nginx.conf" -e "$dir/error.log"
}

# nginx_proxy_http DIR WORKERS PORT UPSTREAM [ACCESS]: the rest of an nginx
# reverse proxy's configuration after nginx_common: WORKERS workers on
# 127.0.0.1:PORT proxying to "upstream b", whose policy and server lines are
# UPSTREAM, with keep-alive both ways; ACCESS opens the location (the hooks
# part's access_by_lua_block).
nginx_proxy_http() {
    cat <<EOF
worker_processes $2;
events { worker_connections 10240; }
http {
$(nginx_http_common "$1")
    upstream b {
$4
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }
    server {
        # reuseport: one listening socket per worker, as moonproxy does.
        # Without it the kernel hands most connections to one worker, whose
        # in-flight upstream connections then overflow its 64-slot idle
        # cache and get closed and reopened all the time at 100 clients.
        listen 127.0.0.1:$3 backlog=4096 reuseport;
        location / {
            ${5:-}
            proxy_pass http://b;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
}

# ---------------------------------------------------------------------------
# HAProxy.

# haproxy_common DIR THREADS PORT: an HAProxy configuration up to and
# including "backend be" (the caller adds the balance and server lines):
# THREADS threads, listening on 127.0.0.1:PORT, keep-alive both ways.
# maxconn: the hard RLIMIT_NOFILE here may be 20000 and HAProxy sizes its fd
# table at about 2 x maxconn.
haproxy_common() {
    cat <<EOF
global
    nbthread $2
    maxconn 9800
    pidfile $1/haproxy.pid
defaults
    mode http
    maxconn 9800
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
    timeout http-request 10s
frontend fe
    bind 127.0.0.1:$3
    default_backend be
backend be
EOF
}

# ---------------------------------------------------------------------------
# callgrind.

# cg_incl DUMP FUNCTION: the inclusive Ir of FUNCTION (0 if never called), from
# DUMP's annotation (made once, kept next to it).
cg_incl() {
    [[ -s $1.incl.txt ]] || callgrind_annotate --inclusive=yes --threshold=100 "$1" >"$1.incl.txt" 2>/dev/null || true
    awk -v f=":$2 " 'index($0, f) { gsub(/,/, "", $1); print $1; found = 1; exit }
                     END { if (!found) print 0 }' "$1.incl.txt"
}
