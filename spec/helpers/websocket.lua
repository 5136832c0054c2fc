-- helpers.websocket: a WebSocket (RFC 6455) echo origin and a client for the specs.
--
-- As a script:  luajit spec/helpers/websocket.lua PORT [NAME] [--tls CERT KEY] [--mode MODE]
--   One process, one thread: every connection is a coroutine scheduled with
--   poll(2) through the FFI (select(2) stops at 1024 descriptors; the specs
--   hold 1,000 tunnels open). A connection reads HTTP/1.1 requests:
--     GET with `Upgrade: websocket`, `Connection: upgrade` and a
--       Sec-WebSocket-Key: answered 101 (Sec-WebSocket-Accept, X-Conn-Id: the
--       connection's number) unless the mode says otherwise; then frames:
--       client frames must be masked (an unmasked one: close 1002), server
--       frames are not; text and binary messages (fragments reassembled) are
--       echoed back whole with their opcode; ping gets a pong with its payload;
--       a close gets a close (same code) and the connection ends; payload
--       lengths 0..125, 126 (16-bit) and 127 (64-bit), up to 64 MiB.
--     GET /_stats  200 JSON {name, accepted (every connection), connections, upgrades, open (tunnels open
--       now), messages (echoed), bytes (payload bytes echoed), eofs (tunnels
--       whose peer ended without a close frame), pings, closes (close frames
--       received), refused (upgrades answered with another status)}; /_stats
--       connections are not counted.
--     anything else: 200 JSON echo {name, method, target, headers, conn_id, conn_req}
--       with Content-Length; keep-alive per HTTP/1.1.
--   Modes (--mode MODE for every upgrade, or `?mode=MODE` on one upgrade):
--     ok          the default: 101 and echo
--     NNN         (also the path /status/NNN) answer the upgrade with that status (200, 403...), body
--                 "upgrade refused NNN\n", Content-Length, keep-alive: the
--                 connection keeps reading requests
--     /hello      (a path) the 101, then at once a text message "hello"
--     close:N     after N echoed messages send a close frame (1000) and close
--     bye         on EOF from the peer (it half-closed) send a text message
--                 "bye after N" (N: messages echoed) and then close; without
--                 it an EOF closes at once
-- As a module:  local ws = require "helpers.websocket"
--   local c, res = ws.connect(port, { path = "/ws", tls = { sni = "localhost", ca = pki.ca },
--                                     headers = { { "X-Test", "1" } }, timeout = 5 })
--     (headers: a list of {name, value}, or a map name -> value)
--     c: a client connection (res: the 101 response, raw_http's); or nil, err,
--     res, conn when the answer was not a 101 (conn: the raw_http connection,
--     still open unless the response closed it: reuse it or close it)
--   c:send(payload, opcode)        one masked frame (opcode: ws.TEXT default,
--                                  ws.BINARY, ws.PING, ws.CLOSE...); true or nil, err
--   c:recv(timeout)                one whole message: opcode, payload; pings are
--                                  answered and skipped; a close frame returns
--                                  ws.CLOSE, payload (not answered); nil,
--                                  "closed" | "timeout" | err
--   c.status, c.headers (lowercase names), c.res: the 101
--   c:echo(payload, opcode)        send then recv; true when the same payload
--                                  and opcode came back, else nil, why
--   c:close(code)                  close frame, wait (bounded) for the peer's,
--                                  then close the socket
--   c:shutdown_write()             TCP FIN (shutdown(SHUT_WR)); reads go on
--   c:wait_closed(timeout)         true once the peer closed (EOF or reset)
--   c:drop()                       close the socket at once
--   ws.accept_key(key), ws.sha1(s), ws.base64(s), ws.frame(payload, opcode, mask)
--   ws.start_origin(name, opts)    spawn this script (helpers.proxy) on a free
--                                  port: o.port, o.addr, o:stats(), o:stop();
--                                  opts.mode, opts.tls = { cert, key }
local bit = require "bit"
local ffi = require "ffi"
local socket = require "socket"

local band, bor, bxor, bnot = bit.band, bit.bor, bit.bxor, bit.bnot
local lshift, rshift, rol, tobit = bit.lshift, bit.rshift, bit.rol, bit.tobit

local M = {}

M.CONT, M.TEXT, M.BINARY, M.CLOSE, M.PING, M.PONG = 0, 1, 2, 8, 9, 10
M.GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
M.MAX_MESSAGE = 64 * 1048576

--------------------------------------------------------------------------
-- SHA-1 (FIPS 180-4) and base64: all the handshake needs.

local function be32(s, i)
    local a, b, c, d = s:byte(i, i + 3)
    return bor(lshift(a, 24), lshift(b, 16), lshift(c, 8), d)
end

local function hex32(x)
    return string.format("%08x", x % 4294967296)
end

function M.sha1_hex(msg)
    local h0, h1, h2, h3, h4 = tobit(0x67452301), tobit(0xEFCDAB89), tobit(0x98BADCFE), tobit(0x10325476),
        tobit(0xC3D2E1F0)
    local n = #msg
    local bits = n * 8
    msg = msg .. "\128" .. string.rep("\0", (55 - n) % 64) .. "\0\0\0\0"
        .. string.char(rshift(bits, 24) % 256, rshift(bits, 16) % 256, rshift(bits, 8) % 256, bits % 256)
    local w = {}
    for chunk = 1, #msg, 64 do
        for i = 0, 15 do w[i] = be32(msg, chunk + i * 4) end
        for i = 16, 79 do w[i] = rol(bxor(w[i - 3], w[i - 8], w[i - 14], w[i - 16]), 1) end
        local a, b, c, d, e = h0, h1, h2, h3, h4
        for i = 0, 79 do
            local f, k
            if i < 20 then
                f, k = bor(band(b, c), band(bnot(b), d)), 0x5A827999
            elseif i < 40 then
                f, k = bxor(b, c, d), 0x6ED9EBA1
            elseif i < 60 then
                f, k = bor(band(b, c), band(b, d), band(c, d)), 0x8F1BBCDC
            else
                f, k = bxor(b, c, d), 0xCA62C1D6
            end
            local t = tobit(rol(a, 5) + f + e + k + w[i])
            e, d, c, b, a = d, c, rol(b, 30), a, t
        end
        h0, h1, h2, h3, h4 = tobit(h0 + a), tobit(h1 + b), tobit(h2 + c), tobit(h3 + d), tobit(h4 + e)
    end
    return hex32(h0) .. hex32(h1) .. hex32(h2) .. hex32(h3) .. hex32(h4)
end

function M.sha1(msg)
    return (M.sha1_hex(msg):gsub("%x%x", function(x) return string.char(tonumber(x, 16)) end))
end

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

function M.base64(s)
    local out = {}
    for i = 1, #s, 3 do
        local a, b, c = s:byte(i, i + 2)
        local n = a * 65536 + (b or 0) * 256 + (c or 0)
        local q = { rshift(n, 18), band(rshift(n, 12), 63), band(rshift(n, 6), 63), band(n, 63) }
        local piece = ""
        for j = 1, 4 do piece = piece .. B64:sub(q[j] + 1, q[j] + 1) end
        if not b then
            piece = piece:sub(1, 2) .. "=="
        elseif not c then
            piece = piece:sub(1, 3) .. "="
        end
        out[#out + 1] = piece
    end
    return table.concat(out)
end

function M.accept_key(key)
    return M.base64(M.sha1(key .. M.GUID))
end

--------------------------------------------------------------------------
-- Frames.

-- XORs payload with the 4-byte mask (a string), in C-speed loops through the FFI.
local function apply_mask(payload, mask)
    local n = #payload
    if n == 0 then return payload end
    local buf = ffi.new("uint8_t[?]", n)
    ffi.copy(buf, payload, n)
    local m0, m1, m2, m3 = mask:byte(1, 4)
    local m = { [0] = m0, m1, m2, m3 }
    for i = 0, n - 1 do buf[i] = bxor(buf[i], m[band(i, 3)]) end
    return ffi.string(buf, n)
end

local function length_bytes(n)
    if n < 126 then return "", n end
    if n < 65536 then return string.char(rshift(n, 8), band(n, 255)), 126 end
    local hi, lo = math.floor(n / 4294967296), n % 4294967296
    return string.char(rshift(hi, 24) % 256, rshift(hi, 16) % 256, rshift(hi, 8) % 256, hi % 256,
        rshift(lo, 24) % 256, rshift(lo, 16) % 256, rshift(lo, 8) % 256, lo % 256), 127
end

-- One frame: FIN set, opcode (default TEXT), masked with mask (a 4-byte
-- string) when given.
function M.frame(payload, opcode, mask, fin)
    local ext, len7 = length_bytes(#payload)
    local b0 = bor(fin == false and 0 or 0x80, opcode or M.TEXT)
    if mask then
        return string.char(b0, bor(0x80, len7)) .. ext .. mask .. apply_mask(payload, mask)
    end
    return string.char(b0, len7) .. ext .. payload
end

-- Reads one frame with read(n) (n bytes exactly, or nil, err). Returns
-- { fin, opcode, payload, masked }, or nil, err.
function M.read_frame(read, max)
    local h, err = read(2)
    if not h then return nil, err end
    local b0, b1 = h:byte(1, 2)
    local f = { fin = band(b0, 0x80) ~= 0, opcode = band(b0, 0x0f), masked = band(b1, 0x80) ~= 0 }
    if band(b0, 0x70) ~= 0 then return nil, "reserved bits set" end
    local n = band(b1, 0x7f)
    if n == 126 then
        local e, eerr = read(2)
        if not e then return nil, eerr end
        n = e:byte(1) * 256 + e:byte(2)
    elseif n == 127 then
        local e, eerr = read(8)
        if not e then return nil, eerr end
        n = 0
        for i = 1, 8 do n = n * 256 + e:byte(i) end
    end
    if n > (max or M.MAX_MESSAGE) then return nil, "frame too large: " .. n end
    local mask
    if f.masked then
        mask, err = read(4)
        if not mask then return nil, err end
    end
    local p = ""
    if n > 0 then
        p, err = read(n)
        if not p then return nil, err end
    end
    f.payload = mask and apply_mask(p, mask) or p
    return f
end

local function random_bytes(n)
    local t = {}
    for i = 1, n do t[i] = string.char(math.random(0, 255)) end
    return table.concat(t)
end

--------------------------------------------------------------------------
-- The client.

local Client = {}
Client.__index = Client

-- Reads exactly n bytes (the handshake's leftovers first) before deadline.
function Client:read_n(n, deadline)
    local parts, got = {}, 0
    if #self.conn.buf > 0 then
        local piece = self.conn.buf:sub(1, n)
        self.conn.buf = self.conn.buf:sub(#piece + 1)
        parts[1], got = piece, #piece
    end
    local sock = self.conn.sock
    while got < n do
        local left = deadline - socket.gettime()
        if left <= 0 then return nil, "timeout" end
        sock:settimeout(math.min(left, 1))
        local data, err, partial = sock:receive(n - got)
        local piece = data or partial
        if piece and #piece > 0 then
            parts[#parts + 1] = piece
            got = got + #piece
        end
        if err and err ~= "timeout" then return nil, err end
    end
    return table.concat(parts)
end

function Client:send_raw(data)
    return self.conn:send(data)
end

function Client:send(payload, opcode)
    return self.conn:send(M.frame(payload or "", opcode or M.TEXT, random_bytes(4)))
end

function Client:recv(timeout)
    local deadline = socket.gettime() + (timeout or self.timeout)
    local read = function(n) return self:read_n(n, deadline) end
    local parts, opcode = {}, nil
    while true do
        local f, err = M.read_frame(read)
        if not f then return nil, err end
        if f.masked then return nil, "the server masked a frame" end
        if f.opcode == M.PING then
            local ok, serr = self.conn:send(M.frame(f.payload, M.PONG, random_bytes(4)))
            if not ok then return nil, serr end
        elseif f.opcode == M.CLOSE or f.opcode == M.PONG then
            return f.opcode, f.payload
        else
            if f.opcode ~= M.CONT then opcode = f.opcode end
            parts[#parts + 1] = f.payload
            if f.fin then return opcode, table.concat(parts) end
        end
    end
end

function Client:echo(payload, opcode)
    opcode = opcode or M.TEXT
    local ok, err = self:send(payload, opcode)
    if not ok then return nil, "send: " .. tostring(err) end
    local op, back = self:recv()
    if not op then return nil, "recv: " .. tostring(back) end
    if op ~= opcode then return nil, "opcode " .. tostring(op) .. " instead of " .. opcode end
    if back ~= payload then return nil, string.format("%d bytes came back instead of %d (or others)", #back, #payload) end
    return true
end

function Client:close(code)
    code = code or 1000
    local ok = self:send(string.char(rshift(code, 8), band(code, 255)), M.CLOSE)
    local deadline = socket.gettime() + self.timeout
    while ok and socket.gettime() < deadline do
        local op = self:recv(math.max(0.01, deadline - socket.gettime()))
        if op == M.CLOSE or op == nil then break end
    end
    self:drop()
end

function Client:shutdown_write()
    local tcp = self.conn.sock.tcp or self.conn.sock
    return tcp:shutdown("send")
end

-- True once the peer closed (EOF or reset) within timeout; bytes that
-- arrive meanwhile are read and dropped (counted in self.dropped).
function Client:wait_closed(timeout)
    local deadline = socket.gettime() + (timeout or self.timeout)
    local sock = self.conn.sock
    self.conn.buf = ""
    self.dropped = self.dropped or 0
    while true do
        local left = deadline - socket.gettime()
        if left <= 0 then return false end
        sock:settimeout(math.min(left, 0.5))
        local data, err, partial = sock:receive(65536)
        local piece = data or partial
        if piece then self.dropped = self.dropped + #piece end
        if err and err ~= "timeout" then return true, err end
    end
end

function Client:drop()
    if not self.closed then
        self.closed = true
        self.conn:close()
    end
end

-- The handshake request's bytes (path, host, extra headers {{name, value}}).
function M.handshake_request(path, host, key, headers)
    local t = { "GET " .. (path or "/") .. " HTTP/1.1", "Host: " .. (host or "localhost"),
        "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: " .. key,
        "Sec-WebSocket-Version: 13" }
    for k, hv in pairs(headers or {}) do -- a list of {name, value} or a map name -> value
        if type(k) == "string" then
            t[#t + 1] = k .. ": " .. hv
        else
            t[#t + 1] = hv[1] .. ": " .. hv[2]
        end
    end
    return table.concat(t, "\r\n") .. "\r\n\r\n"
end

-- Connects to 127.0.0.1:port and upgrades. opts: path, host, headers,
-- timeout (s, default 5, for each step), tls (helpers.tls.connect's opts:
-- sni, ca...; true for defaults). See the top of the file for the results.
function M.connect(port, opts)
    opts = opts or {}
    local raw = require "helpers.raw_http"
    local timeout = opts.timeout or 5
    local conn, err
    if opts.tls then
        local topts = {}
        for k, v in pairs(type(opts.tls) == "table" and opts.tls or {}) do topts[k] = v end
        topts.timeout = topts.timeout or timeout
        conn, err = require("helpers.tls").connect(port, topts)
    else
        conn, err = raw.connect(port, { timeout = timeout })
    end
    if not conn then return nil, "connect: " .. tostring(err) end
    local key = M.base64(random_bytes(16))
    local ok, serr = conn:send(M.handshake_request(opts.path, opts.host, key, opts.headers))
    if not ok then
        conn:close()
        return nil, "send handshake: " .. tostring(serr)
    end
    -- interim: a 101 ends the HTTP exchange; raw_http must not look past it
    local res, rerr = conn:read_response { interim = true, timeout = timeout }
    if not res then
        conn:close()
        return nil, "handshake response: " .. tostring(rerr)
    end
    if res.status ~= 101 then return nil, "status " .. res.status, res, conn end
    if not res:has_token("upgrade", "websocket") then
        conn:close()
        return nil, "101 without Upgrade: websocket", res
    end
    if res:header("sec-websocket-accept") ~= M.accept_key(key) then
        conn:close()
        return nil, "bad Sec-WebSocket-Accept " .. tostring(res:header("sec-websocket-accept")), res
    end
    local headers = {}
    for _, hv in ipairs(res.headers) do headers[hv[1]:lower()] = hv[2] end
    return setmetatable({ conn = conn, res = res, status = 101, headers = headers, timeout = timeout }, Client), res
end

-- Starts this file as an origin (see the top). opts: mode, tls = { cert, key }, args.
function M.start_origin(name, opts)
    opts = opts or {}
    local h = require "helpers.proxy"
    local raw = require "helpers.raw_http"
    local here = (debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$")) or "spec/helpers"
    local args = {}
    if opts.mode then args[#args + 1], args[#args + 2] = "--mode", opts.mode end
    if opts.tls then
        args[#args + 1], args[#args + 2], args[#args + 3] = "--tls", opts.tls.cert, opts.tls.key
    end
    for _, a in ipairs(opts.args or {}) do args[#args + 1] = a end
    local get = raw.get
    if opts.tls then
        get = function(port, target, headers, ropts)
            return require("helpers.tls").get(port, target, headers, ropts)
        end
    end
    local saved = h.ORIGIN_SCRIPT
    h.ORIGIN_SCRIPT = here .. "/websocket.lua"
    local ok, o = pcall(h.start_origin, name, { args = args, get = get })
    h.ORIGIN_SCRIPT = saved
    if not ok then error(o, 2) end
    return o
end

-- required (the first argument is the module name), not run with a PORT
if not tonumber((...)) and not (arg and arg[0] and arg[0]:match("websocket%.lua$") and (...) == nil) then
    return M
end

--------------------------------------------------------------------------
-- The origin (run as a script).

local cjson = require "cjson"
local ssl -- LuaSec, only with --tls

pcall(ffi.cdef, [[
struct mp_ws_pollfd { int fd; short events; short revents; };
int poll(struct mp_ws_pollfd *fds, unsigned long nfds, int timeout);
]])
local POLLIN, POLLOUT, POLLERR, POLLHUP = 1, 4, 8, 16

local NAME = "ws"
local MODE = "ok"
local TLS_CTX
local IO_TIMEOUT = 30
local stats = { connections = 0, upgrades = 0, open = 0, messages = 0, bytes = 0, eofs = 0, pings = 0,
    closes = 0, refused = 0 }
local accepted = 0

local function log(...)
    io.stderr:write("ws origin ", NAME, ": ", table.concat({ ... }, " "), "\n")
end

-- Scheduling: a coroutine yields (read_sock, write_sock, deadline) and is
-- resumed with "ready" or "timeout".
local waiting = {}

local function wait(r, w, deadline)
    return coroutine.yield(r, w, deadline)
end

local function resume(co, ...)
    local ok, r, w, dl = coroutine.resume(co, ...)
    if not ok then log("task failed:", tostring(r)) end
    if coroutine.status(co) == "dead" then
        waiting[co] = nil
    else
        waiting[co] = { r = r, w = w, dl = dl }
    end
end

local Conn = {}
Conn.__index = Conn

local function soft(err)
    return err == "timeout" or err == "wantread" or err == "wantwrite"
end

-- Appends what the socket has to the buffer (a list of pieces); waits
-- until deadline. True, or nil and "closed" | "timeout" | an error.
function Conn:fill(deadline)
    if self.eof then return nil, "closed" end
    while true do
        local data, err, partial = self.sock:receive(262144)
        local got = data or partial
        if err and not soft(err) then self.eof = true end
        if got and #got > 0 then
            self.parts[#self.parts + 1] = got
            self.have = self.have + #got
            return true
        end
        if self.eof then return nil, err end
        if wait(self.sock, nil, deadline) == "timeout" then return nil, "timeout" end
    end
end

local function join(self)
    if #self.parts > 1 then self.parts = { table.concat(self.parts) } end
    return self.parts[1] or ""
end

-- Exactly n bytes, or nil, err.
function Conn:read(n, deadline)
    while self.have < n do
        local ok, err = self:fill(deadline or (socket.gettime() + IO_TIMEOUT))
        if not ok then return nil, err end
    end
    local s = join(self)
    self.parts = { s:sub(n + 1) }
    self.have = self.have - n
    return s:sub(1, n)
end

function Conn:read_head(deadline)
    while true do
        local s = join(self)
        local e = s:find("\r\n\r\n", 1, true)
        if e then
            self.parts = { s:sub(e + 4) }
            self.have = #self.parts[1]
            return s:sub(1, e - 1)
        end
        if #s > 65536 then return nil, "head too large" end
        local ok, err = self:fill(deadline)
        if not ok then return nil, err end
    end
end

function Conn:send(data)
    local i, n = 1, #data
    while i <= n do
        local last, err, lastpart = self.sock:send(data, i)
        if last then
            i = last + 1
        else
            if not soft(err) then return nil, err end
            i = (lastpart or i - 1) + 1
            local r, w = nil, self.sock
            if err == "wantread" then r, w = self.sock, nil end
            if i <= n and wait(r, w, socket.gettime() + IO_TIMEOUT) == "timeout" then return nil, "timeout" end
        end
    end
    return true
end

local function parse_request(head)
    local lines = {}
    for line in (head .. "\r\n"):gmatch("(.-)\r\n") do lines[#lines + 1] = line end
    local method, target, version = lines[1]:match("^(%S+) (%S+) (HTTP/%d%.%d)$")
    if not method then return nil end
    local req = { method = method, target = target, version = version, headers = {}, h = {} }
    for i = 2, #lines do
        local n, v = lines[i]:match("^([^:]+):[ \t]*(.-)[ \t]*$")
        if n then
            req.headers[#req.headers + 1] = { n, v }
            local k = n:lower()
            req.h[k] = req.h[k] and (req.h[k] .. ", " .. v) or v
        end
    end
    req.path, req.query = target:match("^([^?]*)%??(.*)$")
    req.q = {}
    for k, v in req.query:gmatch("([^&=]+)=([^&]*)") do req.q[k] = v end
    return req
end

local function has_token(value, token)
    for t in (value or ""):gmatch("[^,]+") do
        if t:match("^%s*(.-)%s*$"):lower() == token then return true end
    end
    return false
end

function Conn:respond(req, status, body, extra)
    local keep = not has_token(req.h.connection, "close")
    local head = string.format("HTTP/1.1 %d %s\r\nX-Origin: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n",
        status, status == 200 and "OK" or "Whatever", NAME, extra or "text/plain", #body,
        "X-Conn-Id: " .. self.id .. "\r\n", keep and "" or "Connection: close\r\n")
    if not self:send(head .. body) then return false end
    return keep
end

function Conn:send_frame(payload, opcode)
    return self:send(M.frame(payload, opcode))
end

-- The tunnel after a 101: echo until a close, an EOF or an error.
function Conn:tunnel(mode)
    local close_after = tonumber(mode:match("^close:(%d+)$"))
    local bye = mode == "bye"
    local echoed = 0
    local read = function(n) return self:read(n, socket.gettime() + 3600) end
    local parts, opcode = {}, nil
    while true do
        local f, err = M.read_frame(read)
        if not f then
            if err == "closed" then
                stats.eofs = stats.eofs + 1
                if bye then self:send_frame("bye after " .. echoed, M.TEXT) end
            else
                log("connection", self.id, "frame:", tostring(err))
            end
            return
        end
        if not f.masked then
            self:send_frame(string.char(3, 234) .. "unmasked", M.CLOSE) -- 1002
            return
        end
        if f.opcode == M.CLOSE then
            stats.closes = stats.closes + 1
            self:send_frame(f.payload:sub(1, 2), M.CLOSE)
            return
        elseif f.opcode == M.PING then
            stats.pings = stats.pings + 1
            if not self:send_frame(f.payload, M.PONG) then return end
        elseif f.opcode ~= M.PONG then -- a pong is dropped
            if f.opcode ~= M.CONT then opcode = f.opcode end
            parts[#parts + 1] = f.payload
            if f.fin then
                local msg = table.concat(parts)
                parts = {}
                if not self:send_frame(msg, opcode or M.BINARY) then return end
                echoed = echoed + 1
                stats.messages = stats.messages + 1
                stats.bytes = stats.bytes + #msg
                if close_after and echoed >= close_after then
                    self:send_frame(string.char(3, 232), M.CLOSE) -- 1000
                    return
                end
            end
        end
    end
end

function Conn:upgrade(req)
    local mode = req.q.mode or req.path:match("^/status/(%d%d%d)$") or MODE
    local code = tonumber(mode:match("^(%d%d%d)$"))
    if code then
        stats.refused = stats.refused + 1
        return self:respond(req, code, "upgrade refused " .. code .. "\n")
    end
    local key = req.h["sec-websocket-key"]
    if not key or not has_token(req.h.connection, "upgrade") then
        return self:respond(req, 400, "not a websocket handshake\n")
    end
    local ok = self:send(string.format("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        .. "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\nX-Origin: %s\r\nX-Conn-Id: %d\r\n\r\n",
        M.accept_key(key), NAME, self.id))
    if not ok then return false end
    stats.upgrades = stats.upgrades + 1
    if req.path == "/hello" and not self:send_frame("hello", M.TEXT) then return false end
    stats.open = stats.open + 1
    local tok, err = pcall(self.tunnel, self, mode)
    stats.open = stats.open - 1
    if not tok then log("connection", self.id, "tunnel error:", tostring(err)) end
    return false
end

local function handle(c, req)
    if req.path == "/_stats" then
        local s = { name = NAME, accepted = accepted }
        for k, v in pairs(stats) do s[k] = v end
        return c:respond(req, 200, cjson.encode(s), "application/json")
    end
    if not c.counted then
        c.counted = true
        stats.connections = stats.connections + 1
    end
    c.nreq = c.nreq + 1
    if has_token(req.h.upgrade, "websocket") then return c:upgrade(req) end
    return c:respond(req, 200, cjson.encode { name = NAME, method = req.method, target = req.target,
        headers = req.headers, conn_id = c.id, conn_req = c.nreq }, "application/json")
end

local function tls_accept(c)
    local s, err = ssl.wrap(c.tcp, TLS_CTX)
    if not s then return nil, err end
    s:settimeout(0)
    c.sock = s
    local deadline = socket.gettime() + IO_TIMEOUT
    while true do
        local ok, herr = s:dohandshake()
        if ok then return true end
        if herr ~= "wantread" and herr ~= "wantwrite" then return nil, herr end
        local r, w = s, nil
        if herr == "wantwrite" then r, w = nil, s end
        if wait(r, w, deadline) == "timeout" then return nil, "handshake timeout" end
    end
end

local function serve(sock)
    accepted = accepted + 1
    local c = setmetatable({ sock = sock, tcp = sock, parts = {}, have = 0, id = accepted, nreq = 0 }, Conn)
    local ok, err = pcall(function()
        if TLS_CTX then
            local hs, herr = tls_accept(c)
            if not hs then
                log("connection", c.id, "TLS handshake failed:", tostring(herr))
                return
            end
        end
        while true do
            local head = c:read_head(socket.gettime() + 300)
            if not head then break end
            local req = parse_request(head)
            if not req then
                c:send("HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                break
            end
            if not handle(c, req) then break end
        end
    end)
    if not ok then log("connection", c.id, "error:", tostring(err)) end
    c.sock:close()
end

local function main(argv)
    local port = tonumber(argv[1])
    if not port then
        io.stderr:write("usage: luajit spec/helpers/websocket.lua PORT [NAME] [--tls CERT KEY] [--mode MODE]\n")
        os.exit(2)
    end
    local i, cert, key = 2, nil, nil
    while argv[i] do
        if argv[i] == "--tls" then
            cert, key = assert(argv[i + 1], "--tls CERT KEY"), assert(argv[i + 2], "--tls CERT KEY")
            i = i + 3
        elseif argv[i] == "--mode" then
            MODE = assert(argv[i + 1], "--mode MODE")
            i = i + 2
        else
            NAME = argv[i]
            i = i + 1
        end
    end
    if cert then
        ssl = require "ssl"
        local err
        TLS_CTX, err = ssl.newcontext { mode = "server", protocol = "any", certificate = cert, key = key,
            verify = "none", options = { "all", "no_sslv3", "no_tlsv1", "no_tlsv1_1" } }
        assert(TLS_CTX, err)
    end
    local server = assert(socket.bind("127.0.0.1", port, 2048))
    server:settimeout(0)
    log("listening on 127.0.0.1:" .. port)
    local fds = ffi.new("struct mp_ws_pollfd[?]", 8192)
    local cap = 8192
    while true do
        local now = socket.gettime()
        local tmo = 1
        local list, n = {}, 1
        fds[0].fd, fds[0].events, fds[0].revents = server:getfd(), POLLIN, 0
        local dirty = false
        for co, wt in pairs(waiting) do
            local s = wt.r or wt.w
            if s then
                if n >= cap then
                    cap = cap * 2
                    local nf = ffi.new("struct mp_ws_pollfd[?]", cap)
                    ffi.copy(nf, fds, n * ffi.sizeof("struct mp_ws_pollfd"))
                    fds = nf
                end
                fds[n].fd = s:getfd()
                fds[n].events = wt.r and POLLIN or POLLOUT
                fds[n].revents = 0
                list[n] = co
                n = n + 1
                if wt.r and wt.r.dirty and wt.r:dirty() then dirty = true end -- TLS bytes decrypted already
            end
            if wt.dl and wt.dl - now < tmo then tmo = math.max(0, wt.dl - now) end
        end
        if dirty then tmo = 0 end
        ffi.C.poll(fds, n, math.floor(tmo * 1000))
        if band(fds[0].revents, POLLIN) ~= 0 then
            for _ = 1, 256 do
                local client = server:accept()
                if not client then break end
                client:settimeout(0)
                client:setoption("tcp-nodelay", true)
                resume(coroutine.create(serve), client)
            end
        end
        now = socket.gettime()
        local ready = {}
        for j = 1, n - 1 do
            local co = list[j]
            local wt = waiting[co]
            if wt then
                local fired = band(fds[j].revents, bor(POLLIN, POLLOUT, POLLERR, POLLHUP)) ~= 0
                    or (wt.r and wt.r.dirty and wt.r:dirty())
                if fired then
                    ready[#ready + 1] = { co, "ready" }
                elseif wt.dl and now >= wt.dl then
                    ready[#ready + 1] = { co, "timeout" }
                end
            end
        end
        for co, wt in pairs(waiting) do -- a pure timer (no socket)
            if not (wt.r or wt.w) and wt.dl and now >= wt.dl then ready[#ready + 1] = { co, "timeout" } end
        end
        for _, x in ipairs(ready) do resume(x[1], x[2]) end
    end
end

local ok, err = pcall(main, { ... })
if not ok then
    if tostring(err):find("interrupted", 1, true) then os.exit(0) end
    io.stderr:write("ws origin ", NAME, ": ", tostring(err), "\n")
    os.exit(1)
end
