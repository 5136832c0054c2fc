# shellcheck shell=bash
# scripts/bench/chunked.sh — BODY=chunked and BODY=chunked-trailer: the comparison
# (compare.sh) with every request a POST carrying a 4 KiB chunked body, which the
# proxy decodes and re-frames; no idle-memory or hooks part.
# Sourced by scripts/bench.sh (after lib.sh and proxies.sh), never run: it defines
# functions and the state they share; bench.sh's main picks the mode.

# chunked_wrk_args: writes the wrk request script for $BODY into the temp dir and
# adds it to WRK_ARGS.
chunked_wrk_args() {
    # a trailer field only with BODY=chunked-trailer
    if [[ $BODY == chunked-trailer ]]; then echo 'local trailer = "X-Checksum: 1\r\n"'; else echo 'local trailer = ""'; fi >"$TMP/chunked.lua"
    cat >>"$TMP/chunked.lua" <<'EOF'
-- POST / with a 4 KiB chunked body: four 1 KiB chunks, one with an
-- extension, as the client framed it.
local chunk = string.rep("x", 1024)
local parts = {}
for i = 1, 4 do
    parts[#parts + 1] = string.format("%x", #chunk) .. (i == 2 and ";ext=1" or "") .. "\r\n" .. chunk .. "\r\n"
end
local req = "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n" ..
    table.concat(parts) .. "0\r\n" .. trailer .. "\r\n"
request = function() return req end
EOF
    WRK_ARGS+=(-s "$TMP/chunked.lua")
}
