#!/bin/bash
# `make run`: start the demo origin on 127.0.0.1:9001, then moonproxy on
# examples/quickstart.lua (127.0.0.1:8080) until it exits or Ctrl-C. Both are
# stopped by their PIDs on the way out.
# Usage: scripts/run-demo.sh [path/to/moonproxy]
set -u

bin=${1:-build/moonproxy}
cd "$(dirname "$0")/.." || exit 1

origin_pid=
proxy_pid=

cleanup() {
    [ -n "$proxy_pid" ] && kill -TERM "$proxy_pid" 2>/dev/null && wait "$proxy_pid" 2>/dev/null
    [ -n "$origin_pid" ] && kill -TERM "$origin_pid" 2>/dev/null && wait "$origin_pid" 2>/dev/null
    return 0
}
trap cleanup EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

for port in 9001 8080; do
    if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
        echo "run-demo: 127.0.0.1:$port is already in use (an earlier demo still running?)" >&2
        exit 1
    fi
done

luajit spec/helpers/origin.lua 9001 demo &
origin_pid=$!

# Wait (at most 5 s) for the origin to listen before starting the proxy.
for _ in $(seq 50); do
    (exec 3<>/dev/tcp/127.0.0.1/9001) 2>/dev/null && break
    if ! kill -0 "$origin_pid" 2>/dev/null; then
        echo "run-demo: the demo origin did not start on 127.0.0.1:9001" >&2
        exit 1
    fi
    sleep 0.1
done

echo "moonproxy demo: origin on 127.0.0.1:9001, proxy on 127.0.0.1:8080 (Ctrl-C stops both)"
echo "try: curl localhost:8080/api/hello"
"$bin" -c examples/quickstart.lua &
proxy_pid=$!
wait "$proxy_pid"
status=$?
proxy_pid=
exit "$status"
