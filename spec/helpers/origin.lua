-- helpers.origin: the real backend the end-to-end specs put behind moonproxy.
--
-- As a script:  luajit spec/helpers/origin.lua PORT [NAME] [--idle SECONDS]
--                  [--mode MODE] [--tls CERT KEY [--client-ca CA]] [--host IP]
--   One process, one thread: every connection is a coroutine scheduled with
--   socket.select, so a slow or hanging request never blocks the others.
--   HTTP/1.1 keep-alive and pipelining, Content-Length and chunked request
--   bodies (extensions and trailers allowed), `Expect: 100-continue`.
--   --idle closes a connection idle between requests for SECONDS (default 60).
--   --mode starts the origin in that failure mode (see /_mode; default ok).
--   --tls serves TLS (LuaSec, TLS 1.2 and 1.3) with that certificate and
--   key: the handshake runs in the connection's coroutine over the
--   non-blocking socket; --client-ca asks every client for a certificate that
--   CA signed (a client without one fails the handshake). --host binds that
--   loopback address instead of 127.0.0.1 (127.0.0.2: spec/e2e/dns_spec.lua).
-- As a module:  require "helpers.origin" returns the body pattern and the
--   checksum below (no server is started), so specs compute what to expect.
--
-- Endpoints (exact paths; every response carries `X-Origin: NAME`):
--   /_stats          200 JSON {name, connections, open, requests, completed,
--                    aborted, closed_by_peer}. `requests` counts request heads,
--                    `completed` requests whose body was fully received,
--                    `aborted` requests whose body never completed,
--                    `closed_by_peer` connections the peer closed while a
--                    complete request was waiting for (or receiving) its
--                    answer. /_stats itself and the connections that carry it
--                    are not counted. Also `paths`: {path = count} of the
--                    counted requests (e.g. paths["/health"]: active probes),
--                    and `mode`, `health_mode` (see /_mode). With --tls:
--                    `tls_handshakes` (completed handshakes, those of the
--                    /_stats connections left out), `tls_failed` (handshakes
--                    that failed), `tls_clients` (the CN of each client
--                    certificate seen, in order) and `tls_sni` (the name each
--                    handshake asked for, "" for none, in order).
--   /_mode?set=MODE&health=MODE   failure injection for the whole origin
--                    (not counted, like /_stats; answers 200 JSON {mode,
--                    health_mode}). MODE applies to every request after its
--                    whole head and body were read, except /_stats and /_mode:
--                      ok        normal behaviour (the endpoints below)
--                      NNN       answer that status, body "mode NNN\n"
--                      reset     close with a TCP reset, nothing answered
--                      close     close (FIN), nothing answered
--                      stall     never answer; wait (at most 300 s) for the peer
--                      slow:N    wait N ms (a timer), then behave normally
--                                (also `set=slow&ms=N`)
--                      partial   a 200 head promising 2000 bytes (Content-Length)
--                                and 1000 of them, then a TCP reset
--                    `health=MODE` gives the path /health its own mode
--                    (`health=follow`, the default, makes it use the main one).
--   /big?size=N&chunked=1   N bytes of the pattern (Content-Length, or chunked
--                    with chunked=1; close-delimited for an HTTP/1.0 client).
--   /status/NNN      that status, body "status NNN\n" (none for 1xx/204/304;
--                    `cl=N` sends `Content-Length: N` anyway, with no body).
--   /slow?ms=N       the echo answer after N ms (a timer, not a blocking sleep).
--   /slowbody?ms=N   the head at once, the body ("slow body\n") after N ms.
--   /reset           read the request, then close with a TCP reset.
--   /garbage         answer "NOT-HTTP garbage garbage" and close.
--   /close           the echo answer with `Connection: close`, then close.
--   /noframe?size=N  N bytes (default 1000) of the pattern with neither
--                    Content-Length nor chunked: the body ends at close.
--   /hang            never answer; wait (at most 300 s) for the peer to close.
--   /truncated?size=N&chunked=1   a head promising N bytes of the pattern
--                    (Content-Length, or chunked), half of them, then close.
--   anything else    200 JSON echo {name, method, target, version, headers =
--                    [[name, value], ...] as received, trailers = [raw lines],
--                    body_len, body_sum, conn_id, conn_req}.
-- Knobs valid on every endpoint (query string, repeatable, URL-encoded):
--   resp_header=Name:Value   add this response header;
--   conn=TOKEN               add TOKEN to the response's Connection header
--                            (so `resp_header=X-Hop:1&conn=X-Hop` sends a
--                            header the proxy must drop as hop-by-hop);
--   early_hints=1            send `103 Early Hints` (with a Link header)
--                            before the response;
--   pad_header=N             add `X-Pad: ` with N bytes of "p".
--
-- Checksum: Adler-32 of the (de-chunked) body as 8 lowercase hex digits.
-- Pattern: byte i of a pattern body is byte (i % 65536) of block(i // 65536),
--   where block(k) = string.format("%015d\n", k) .. FILLER, and FILLER is the
--   65520 first bytes of ALPHABET repeated (ALPHABET below, 64 bytes). The last
--   block is cut to the body's size.

local ffi = require "ffi"

local M = {}

M.BLOCK = 65536
M.ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ-\n"
local FILLER = M.ALPHABET:rep(M.BLOCK / #M.ALPHABET):sub(1, M.BLOCK - 16)

-- Adler-32 state {a, b}; sums stay exact in doubles when reduced every 64 KiB.
function M.sum_new()
    return { 1, 0 }
end

function M.sum_update(st, s)
    local a, b = st[1], st[2]
    local p = ffi.cast("const uint8_t *", s)
    local n, i = #s, 0
    while i < n do
        local e = i + 65536
        if e > n then e = n end
        for j = i, e - 1 do
            a = a + p[j]
            b = b + a
        end
        a, b = a % 65521, b % 65521
        i = e
    end
    st[1], st[2] = a, b
    return st
end

function M.sum_hex(st)
    return string.format("%08x", st[2] * 65536 + st[1])
end

function M.checksum(s)
    return M.sum_hex(M.sum_update(M.sum_new(), s))
end

function M.pattern_block(k)
    return string.format("%015d\n", k) .. FILLER
end

-- Calls fn(piece) for the consecutive pieces (at most 64 KiB) of a pattern body.
function M.pattern_each(size, fn)
    local k, left = 0, size
    while left > 0 do
        local b = M.pattern_block(k)
        if left < #b then b = b:sub(1, left) end
        fn(b)
        left, k = left - #b, k + 1
    end
end

function M.pattern(size)
    local t = {}
    M.pattern_each(size, function(p) t[#t + 1] = p end)
    return table.concat(t)
end

function M.pattern_sum(size)
    local st = M.sum_new()
    M.pattern_each(size, function(p) M.sum_update(st, p) end)
    return M.sum_hex(st)
end

local modname = ...
if modname == "helpers.origin" or modname == "spec.helpers.origin" then
    return M
end

--------------------------------------------------------------------------
-- The server.

local socket = require "socket"
local cjson = require "cjson"
local ssl = require "ssl"
if cjson.encode_empty_table_as_object then cjson.encode_empty_table_as_object(false) end

local MAX_HEAD = 256 * 1024
local IO_TIMEOUT = 30 -- seconds without progress before giving up on a peer

local NAME = "origin"
local IDLE = 60
local HOST = "127.0.0.1" -- the address to bind (--host)
local stats = { connections = 0, open = 0, requests = 0, completed = 0, aborted = 0, closed_by_peer = 0 }
local TLS_CTX = nil -- --tls: LuaSec's server context
local paths = {} -- path -> counted requests
local CONTROL = { ["/_stats"] = true, ["/_mode"] = true } -- not counted, never affected by a mode
local MODE = { kind = "ok", text = "ok" }
local HEALTH_MODE = nil -- nil: /health follows MODE
local accepted = 0
local stats_open = 0 -- connections used for /_stats, hidden from stats.open

local REASONS = {
    [100] = "Continue", [200] = "OK", [201] = "Created", [204] = "No Content",
    [301] = "Moved Permanently", [302] = "Found", [304] = "Not Modified",
    [400] = "Bad Request", [404] = "Not Found", [413] = "Payload Too Large",
    [418] = "I'm a teapot", [431] = "Request Header Fields Too Large",
    [500] = "Internal Server Error", [502] = "Bad Gateway", [503] = "Service Unavailable",
}

local function log(...)
    io.stderr:write("origin ", NAME, ": ", table.concat({ ... }, " "), "\n")
end

-- Scheduling: a connection coroutine yields (read_sock, write_sock, deadline)
-- and is resumed with "ready" or "timeout".
local waiting = {} -- coroutine -> { r = sock, w = sock, dl = time }

local function wait(r, w, deadline)
    return coroutine.yield(r, w, deadline)
end

local function resume(co, ...)
    local ok, r, w, dl = coroutine.resume(co, ...)
    if not ok then
        log("task failed:", tostring(r))
    end
    if coroutine.status(co) == "dead" then
        waiting[co] = nil
    else
        waiting[co] = { r = r, w = w, dl = dl }
    end
end

local function soon()
    return socket.gettime() + IO_TIMEOUT
end

--------------------------------------------------------------------------
-- A client connection: buffered reads, complete writes.

local Conn = {}
Conn.__index = Conn

-- Appends what the socket has to self.buf; waits (until deadline) if nothing.
-- Returns true, or nil and "closed" | "timeout" | a socket error.
function Conn:fill(deadline)
    if self.eof then return nil, "closed" end
    while true do
        local data, err, partial = self.sock:receive(65536)
        local got = data or partial
        if err == "wantread" or err == "wantwrite" then err = "timeout" end -- TLS: not an end
        if err and err ~= "timeout" then self.eof = true end
        if got and #got > 0 then
            self.buf = self.buf .. got
            return true
        end
        if self.eof then return nil, err end
        if wait(self.sock, nil, deadline) == "timeout" then return nil, "timeout" end
    end
end

function Conn:send(data)
    local i, n = 1, #data
    while i <= n do
        local last, err, lastpart = self.sock:send(data, i)
        if last then
            i = last + 1
        else
            if err ~= "timeout" and err ~= "wantwrite" and err ~= "wantread" then return nil, err end
            i = (lastpart or i - 1) + 1
            local r, w = nil, self.sock
            if err == "wantread" then r, w = self.sock, nil end -- TLS: a record to read first
            if i <= n and wait(r, w, soon()) == "timeout" then return nil, "timeout" end
        end
    end
    return true
end

-- One line (without CRLF or LF) out of the buffer, at most limit bytes.
function Conn:read_line(limit)
    while true do
        local nl = self.buf:find("\n", 1, true)
        if nl then
            local line = self.buf:sub(1, nl - 1):gsub("\r$", "")
            self.buf = self.buf:sub(nl + 1)
            return line
        end
        if #self.buf > limit then return nil, "line too long" end
        local ok, err = self:fill(soon())
        if not ok then return nil, err end
    end
end

-- Streams n body bytes into the checksum state st.
function Conn:read_body_bytes(n, st)
    while n > 0 do
        if #self.buf == 0 then
            local ok, err = self:fill(soon())
            if not ok then return nil, err end
        end
        local piece = self.buf
        if #piece > n then
            piece = self.buf:sub(1, n)
            self.buf = self.buf:sub(n + 1)
        else
            self.buf = ""
        end
        M.sum_update(st, piece)
        n = n - #piece
    end
    return true
end

-- Returns true while the peer is still there; appends anything it sent (a
-- pipelined request) to the buffer.
function Conn:peer_alive()
    local data, err, partial = self.sock:receive(65536)
    local got = data or partial
    if got and #got > 0 then self.buf = self.buf .. got end
    if err and err ~= "timeout" and err ~= "wantread" and err ~= "wantwrite" then
        self.eof = true
        return false
    end
    return true
end

-- Waits until deadline; false when the peer closed the connection meanwhile.
function Conn:pause_until(deadline)
    if self.eof then -- the peer half-closed already: nothing to watch
        wait(nil, nil, deadline)
        return true
    end
    while socket.gettime() < deadline do
        if wait(self.sock, nil, deadline) == "timeout" then return true end
        if not self:peer_alive() then return false end
    end
    return true
end

--------------------------------------------------------------------------
-- Requests.

local function header(req, name)
    name = name:lower()
    for _, h in ipairs(req.headers) do
        if h[1]:lower() == name then return h[2] end
    end
end

local function has_token(value, token)
    for t in (value or ""):gmatch("[^,]+") do
        if t:match("^%s*(.-)%s*$"):lower() == token then return true end
    end
    return false
end

local function url_decode(s)
    s = s:gsub("%+", " ")
    return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

local function parse_query(q)
    local t = {}
    for pair in (q or ""):gmatch("[^&]+") do
        local k, v = pair:match("^([^=]*)=?(.*)$")
        k, v = url_decode(k), url_decode(v)
        if t[k] == nil then t[k] = {} end
        table.insert(t[k], v)
    end
    return t
end

-- Reads a head (nil at a clean close or idle timeout) and then the body.
-- Returns req, or nil, err, bad (true when the peer broke HTTP: answer 400).
function Conn:read_request()
    local deadline = socket.gettime() + IDLE
    while not self.buf:find("\r?\n\r?\n") do
        if #self.buf > MAX_HEAD then return nil, "head too large", true end
        local ok, err = self:fill(deadline)
        if not ok then return nil, err end
        deadline = soon()
    end
    local head_end, body_start = self.buf:find("\r?\n\r?\n")
    local head = self.buf:sub(1, head_end - 1)
    self.buf = self.buf:sub(body_start + 1)

    local lines = {}
    for line in (head .. "\n"):gmatch("(.-)\r?\n") do lines[#lines + 1] = line end
    local method, target, version = lines[1]:match("^(%S+) (%S+) (HTTP/%d%.%d)$")
    if not method then return nil, "bad request line: " .. lines[1], true end
    local req = { method = method, target = target, version = version, headers = {}, trailers = {} }
    for i = 2, #lines do
        local name, value = lines[i]:match("^([^:]+):[ \t]*(.-)[ \t]*$")
        if not name then return nil, "bad header line: " .. lines[i], true end
        req.headers[#req.headers + 1] = { name, value }
    end
    req.path, req.query = target:match("^([^?]*)%??(.*)$")
    req.q = parse_query(req.query)
    self.nreq = self.nreq + 1
    if CONTROL[req.path] then
        if self.nreq == 1 then
            self.stats_conn = true
            if self.handshaken then stats.tls_handshakes = stats.tls_handshakes - 1 end
            stats.connections = stats.connections - 1
            stats_open = stats_open + 1
        end
    else
        stats.requests = stats.requests + 1
        paths[req.path] = (paths[req.path] or 0) + 1
    end
    req.conn_req = self.nreq

    local te, cl = header(req, "transfer-encoding"), header(req, "content-length")
    local has_body = (te ~= nil) or (tonumber(cl) or 0) > 0
    if has_body and has_token(header(req, "expect"), "100-continue") and #self.buf == 0 then
        self:send("HTTP/1.1 100 Continue\r\n\r\n")
    end
    local st = M.sum_new()
    req.body_len = 0
    self.in_body = not CONTROL[req.path]
    if te then
        if not has_token(te, "chunked") then return nil, "unsupported transfer-encoding " .. te, true end
        while true do
            local line, err = self:read_line(4096)
            if not line then return nil, err end
            local hex = line:match("^(%x+)[ \t]*;?")
            if not hex then return nil, "bad chunk size line: " .. line, true end
            local size = tonumber(hex, 16)
            if size == 0 then break end
            local ok, berr = self:read_body_bytes(size, st)
            if not ok then return nil, berr end
            req.body_len = req.body_len + size
            local crlf, cerr = self:read_line(4096)
            if crlf ~= "" then return nil, cerr or "missing CRLF after chunk", crlf ~= nil end
        end
        while true do
            local line, err = self:read_line(8192)
            if not line then return nil, err end
            if line == "" then break end
            req.trailers[#req.trailers + 1] = line
        end
    elseif cl then
        local n = tonumber(cl)
        if not n or cl:find("[^%d]") then return nil, "bad content-length " .. cl, true end
        local ok, err = self:read_body_bytes(n, st)
        if not ok then return nil, err end
        req.body_len = n
    end
    req.body_sum = M.sum_hex(st)
    self.in_body = false
    if not CONTROL[req.path] then stats.completed = stats.completed + 1 end
    return req
end

--------------------------------------------------------------------------
-- Responses.

-- The head for status and headers (a list of {name, value}), adding the
-- X-Origin header, the resp_header/conn knobs and the Connection header.
local function build_head(req, status, headers, keep)
    local out = { string.format("HTTP/1.1 %d %s\r\n", status, REASONS[status] or "Whatever") }
    local function add(n, v) out[#out + 1] = n .. ": " .. v .. "\r\n" end
    add("X-Origin", NAME)
    for _, h in ipairs(headers) do add(h[1], h[2]) end
    for _, hv in ipairs(req.q.resp_header or {}) do
        local n, v = hv:match("^([^:]+):(.*)$")
        if n then add(n, v) end
    end
    local conn = {}
    if not keep then
        conn[#conn + 1] = "close"
    elseif req.version == "HTTP/1.0" then
        conn[#conn + 1] = "keep-alive"
    end
    if req.q.pad_header then add("X-Pad", ("p"):rep(tonumber(req.q.pad_header[1]) or 0)) end
    for _, t in ipairs(req.q.conn or {}) do conn[#conn + 1] = t end
    if #conn > 0 then add("Connection", table.concat(conn, ", ")) end
    out[#out + 1] = "\r\n"
    return table.concat(out)
end

local function wants_keepalive(req)
    local c = header(req, "connection")
    if has_token(c, "close") then return false end
    if req.version == "HTTP/1.0" then return has_token(c, "keep-alive") end
    return true
end

local function echo_body(c, req)
    return cjson.encode {
        name = NAME, method = req.method, target = req.target, version = req.version,
        headers = req.headers, trailers = req.trailers, body_len = req.body_len,
        body_sum = req.body_sum, conn_id = c.id, conn_req = req.conn_req,
    }
end

-- Sends status + body with Content-Length; returns whether to keep the connection.
function Conn:respond(req, status, headers, body, keep)
    if keep == nil then keep = wants_keepalive(req) end
    headers = headers or {}
    local no_body = status < 200 or status == 204 or status == 304
    if not no_body then
        headers[#headers + 1] = { "Content-Length", tostring(#body) }
    elseif req.q.cl then
        headers[#headers + 1] = { "Content-Length", req.q.cl[1] }
    end
    local out = build_head(req, status, headers, keep)
    if req.method ~= "HEAD" and not no_body then out = out .. body end
    local ok, err = self:send(out)
    if not ok then
        stats.closed_by_peer = stats.closed_by_peer + 1
        log("send failed:", err)
        return false
    end
    return keep
end

local function json_headers()
    return { { "Content-Type", "application/json" } }
end

local handlers = {}

handlers["/_stats"] = function(c, req)
    local s = {}
    for k, v in pairs(stats) do s[k] = v end
    s.name = NAME
    s.open = stats.open - stats_open
    s.paths = {}
    for k, v in pairs(paths) do s.paths[k] = v end
    s.mode = MODE.text
    s.health_mode = HEALTH_MODE and HEALTH_MODE.text or "follow"
    return c:respond(req, 200, json_headers(), cjson.encode(s))
end

-- A mode from its text (see /_mode), or nil, err.
local function parse_mode(text, ms)
    if text == "ok" or text == "reset" or text == "close" or text == "stall" or text == "partial" then
        return { kind = text, text = text }
    end
    local code = text:match("^(%d%d%d)$")
    if code then return { kind = "status", code = tonumber(code), text = text } end
    local n = text:match("^slow:(%d+)$") or (text == "slow" and (ms or "1000"))
    if n and tonumber(n) then return { kind = "slow", ms = tonumber(n), text = "slow:" .. n } end
    return nil, "unknown mode " .. text
end

handlers["/_mode"] = function(c, req)
    local ms = req.q.ms and req.q.ms[1]
    if req.q.set then
        local m, err = parse_mode(req.q.set[1], ms)
        if not m then return c:respond(req, 400, { { "Content-Type", "text/plain" } }, err .. "\n") end
        MODE = m
    end
    if req.q.health then
        if req.q.health[1] == "follow" then
            HEALTH_MODE = nil
        else
            local m, err = parse_mode(req.q.health[1], ms)
            if not m then return c:respond(req, 400, { { "Content-Type", "text/plain" } }, err .. "\n") end
            HEALTH_MODE = m
        end
    end
    return c:respond(req, 200, json_headers(),
        cjson.encode { mode = MODE.text, health_mode = HEALTH_MODE and HEALTH_MODE.text or "follow" })
end

handlers["/big"] = function(c, req)
    local size = tonumber(req.q.size and req.q.size[1]) or 1024
    local keep = wants_keepalive(req)
    local chunked = req.q.chunked and req.q.chunked[1] == "1"
    local headers = { { "Content-Type", "application/octet-stream" } }
    if chunked and req.version == "HTTP/1.0" then
        chunked, keep = false, false -- an HTTP/1.0 client cannot read chunked
    elseif chunked then
        headers[#headers + 1] = { "Transfer-Encoding", "chunked" }
    else
        headers[#headers + 1] = { "Content-Length", tostring(size) }
    end
    local ok, err = c:send(build_head(req, 200, headers, keep))
    if ok and req.method ~= "HEAD" then
        M.pattern_each(size, function(piece)
            if not ok then return end
            if chunked then piece = string.format("%x\r\n", #piece) .. piece .. "\r\n" end
            ok, err = c:send(piece)
        end)
        if ok and chunked then ok, err = c:send("0\r\n\r\n") end
    end
    if not ok then
        stats.closed_by_peer = stats.closed_by_peer + 1
        log("/big send failed:", err)
        return false
    end
    return keep
end

handlers["/truncated"] = function(c, req)
    local size = tonumber(req.q.size and req.q.size[1]) or 1000
    local chunked = req.q.chunked and req.q.chunked[1] == "1"
    local framing = chunked and { "Transfer-Encoding", "chunked" } or { "Content-Length", tostring(size) }
    local body = M.pattern(math.floor(size / 2))
    if chunked then body = string.format("%x\r\n", size) .. body end
    c:send(build_head(req, 200, { framing }, true) .. body)
    return false
end

handlers["/slow"] = function(c, req)
    local ms = tonumber(req.q.ms and req.q.ms[1]) or 1000
    if not c:pause_until(socket.gettime() + ms / 1000) then
        stats.closed_by_peer = stats.closed_by_peer + 1
        return false
    end
    return c:respond(req, 200, json_headers(), echo_body(c, req))
end

handlers["/slowbody"] = function(c, req)
    local ms = tonumber(req.q.ms and req.q.ms[1]) or 1000
    local body = "slow body\n"
    local keep = wants_keepalive(req)
    local ok = c:send(build_head(req, 200, { { "Content-Length", tostring(#body) } }, keep))
    if ok and req.method ~= "HEAD" then
        ok = c:pause_until(socket.gettime() + ms / 1000) and c:send(body)
    end
    if not ok then
        stats.closed_by_peer = stats.closed_by_peer + 1
        return false
    end
    return keep
end

handlers["/hang"] = function(c)
    if not c:pause_until(socket.gettime() + 300) then
        stats.closed_by_peer = stats.closed_by_peer + 1
    end
    return false
end

handlers["/reset"] = function(c)
    c.tcp:setoption("linger", { on = true, timeout = 0 })
    return false
end

handlers["/garbage"] = function(c)
    c:send("NOT-HTTP garbage garbage\r\n\r\n")
    return false
end

handlers["/close"] = function(c, req)
    return c:respond(req, 200, json_headers(), echo_body(c, req), false)
end

handlers["/noframe"] = function(c, req)
    local size = tonumber(req.q.size and req.q.size[1]) or 1000
    local ok = c:send(build_head(req, 200, { { "Content-Type", "application/octet-stream" } }, false))
    if ok and req.method ~= "HEAD" then
        M.pattern_each(size, function(piece) ok = ok and c:send(piece) end)
    end
    return false
end

-- Applies a failure mode; returns true, keep when it answered (or dropped)
-- the request, false when the request goes on normally.
local function apply_mode(c, req, m)
    if m.kind == "status" then
        return true, c:respond(req, m.code, { { "Content-Type", "text/plain" } }, "mode " .. m.code .. "\n")
    elseif m.kind == "reset" then
        c.tcp:setoption("linger", { on = true, timeout = 0 })
        return true, false
    elseif m.kind == "close" then
        return true, false
    elseif m.kind == "stall" then
        if not c:pause_until(socket.gettime() + 300) then
            stats.closed_by_peer = stats.closed_by_peer + 1
        end
        return true, false
    elseif m.kind == "slow" then
        if not c:pause_until(socket.gettime() + m.ms / 1000) then
            stats.closed_by_peer = stats.closed_by_peer + 1
            return true, false
        end
        return false
    elseif m.kind == "partial" then
        c:send(build_head(req, 200, { { "Content-Length", "2000" } }, true) .. M.pattern(1000))
        c.tcp:setoption("linger", { on = true, timeout = 0 })
        return true, false
    end
    return false
end

local function handle(c, req)
    if not CONTROL[req.path] then
        local m = (req.path == "/health" and HEALTH_MODE) or MODE
        if m.kind ~= "ok" then
            local done, keep = apply_mode(c, req, m)
            if done then return keep end
        end
    end
    if req.q.early_hints and not c:send("HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n") then
        return false
    end
    local h = handlers[req.path]
    if h then return h(c, req) end
    local code = req.path:match("^/status/(%d%d%d)$")
    if code then
        code = tonumber(code)
        return c:respond(req, code, { { "Content-Type", "text/plain" } }, "status " .. code .. "\n")
    end
    return c:respond(req, 200, json_headers(), echo_body(c, req))
end

-- --tls: the server side of the handshake over the non-blocking socket, the
-- coroutine waiting whichever way LuaSec asks. True, or nil and why.
local function tls_accept(c)
    local s, err = ssl.wrap(c.tcp, TLS_CTX)
    if not s then return nil, err end
    s:settimeout(0)
    c.sock = s
    local deadline = soon()
    for _ = 1, 100000 do
        local ok, herr = s:dohandshake()
        if ok then
            c.handshaken = true
            stats.tls_handshakes = stats.tls_handshakes + 1
            stats.tls_sni[#stats.tls_sni + 1] = s:getsniname() or ""
            local cert = s:getpeercertificate()
            for _, e in ipairs(cert and cert:subject() or {}) do
                if e.name == "commonName" then stats.tls_clients[#stats.tls_clients + 1] = e.value end
            end
            return true
        end
        if herr ~= "wantread" and herr ~= "wantwrite" then return nil, herr end
        local r, w = s, nil
        if herr == "wantwrite" then r, w = nil, s end
        if wait(r, w, deadline) == "timeout" then return nil, "handshake timeout" end
    end
    return nil, "handshake did not finish"
end

local function serve(sock)
    accepted = accepted + 1
    stats.connections = stats.connections + 1
    stats.open = stats.open + 1
    local c = setmetatable({ sock = sock, tcp = sock, buf = "", id = accepted, nreq = 0 }, Conn)
    local ok, err = pcall(function()
        if TLS_CTX then
            local hs, herr = tls_accept(c)
            if not hs then
                stats.tls_failed = stats.tls_failed + 1
                log("connection", c.id, "TLS handshake failed:", tostring(herr))
                return
            end
        end
        while true do
            local req, rerr, bad = c:read_request()
            if not req then
                if bad then
                    local msg = "origin: " .. tostring(rerr) .. "\n"
                    c:send(string.format("HTTP/1.1 400 Bad Request\r\nX-Origin: %s\r\nContent-Length: %d\r\n"
                        .. "Connection: close\r\n\r\n%s", NAME, #msg, msg))
                end
                if c.in_body then stats.aborted = stats.aborted + 1 end
                if c.in_body or #c.buf > 0 or (rerr ~= "closed" and rerr ~= "timeout") then
                    log("connection", c.id, "dropped:", tostring(rerr))
                end
                break
            end
            if not handle(c, req) then break end
        end
    end)
    if not ok then log("connection", c.id, "error:", tostring(err)) end
    c.sock:close()
    stats.open = stats.open - 1
    if c.stats_conn then stats_open = stats_open - 1 end
end

local function main(argv)
    local port = tonumber(argv[1])
    if not port then
        io.stderr:write("usage: luajit spec/helpers/origin.lua PORT [NAME] [--idle SECONDS] [--mode MODE]"
            .. " [--tls CERT KEY [--client-ca CA]]\n")
        os.exit(2)
    end
    local i = 2
    local tls_files = {}
    while argv[i] do
        if argv[i] == "--idle" then
            IDLE = assert(tonumber(argv[i + 1]), "--idle needs seconds")
            i = i + 2
        elseif argv[i] == "--tls" then
            tls_files.cert, tls_files.key = assert(argv[i + 1], "--tls CERT KEY"), assert(argv[i + 2], "--tls CERT KEY")
            i = i + 3
        elseif argv[i] == "--client-ca" then
            tls_files.ca = assert(argv[i + 1], "--client-ca CA")
            i = i + 2
        elseif argv[i] == "--host" then
            HOST = assert(argv[i + 1], "--host IP")
            i = i + 2
        elseif argv[i] == "--mode" then
            local m, err = parse_mode(tostring(argv[i + 1]))
            MODE = assert(m, err)
            i = i + 2
        else
            NAME = argv[i]
            i = i + 1
        end
    end
    if tls_files.cert then
        local err
        TLS_CTX, err = ssl.newcontext {
            mode = "server", protocol = "any", certificate = tls_files.cert, key = tls_files.key,
            cafile = tls_files.ca, verify = tls_files.ca and { "peer", "fail_if_no_peer_cert" } or "none",
            options = { "all", "no_sslv3", "no_tlsv1", "no_tlsv1_1" },
        }
        assert(TLS_CTX, err)
        stats.tls_handshakes, stats.tls_failed, stats.tls_clients, stats.tls_sni = 0, 0, {}, {}
    end
    local server = assert(socket.bind(HOST, port, 1024))
    server:settimeout(0)
    log("listening on " .. HOST .. ":" .. port)

    while true do
        local recvt, sendt = { server }, {}
        local now = socket.gettime()
        local tmo = 1
        for _, wt in pairs(waiting) do
            if wt.r then recvt[#recvt + 1] = wt.r end
            if wt.w then sendt[#sendt + 1] = wt.w end
            if wt.dl and wt.dl - now < tmo then tmo = math.max(0, wt.dl - now) end
        end
        local rd, wr = socket.select(recvt, sendt, tmo)
        if rd[server] then
            for _ = 1, 64 do
                local client = server:accept()
                if not client then break end
                client:settimeout(0)
                client:setoption("tcp-nodelay", true)
                local co = coroutine.create(serve)
                resume(co, client)
            end
        end
        now = socket.gettime()
        local ready = {}
        for co, wt in pairs(waiting) do
            if (wt.r and rd[wt.r]) or (wt.w and wr[wt.w]) then
                ready[#ready + 1] = { co, "ready" }
            elseif wt.dl and now >= wt.dl then
                ready[#ready + 1] = { co, "timeout" }
            end
        end
        for _, x in ipairs(ready) do resume(x[1], x[2]) end
    end
end

local ok, err = pcall(main, { ... })
if not ok then
    if tostring(err):find("interrupted", 1, true) then os.exit(0) end -- Ctrl-C
    io.stderr:write("origin ", NAME, ": ", tostring(err), "\n")
    os.exit(1)
end
