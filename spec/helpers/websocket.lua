-- helpers.websocket: a WebSocket echo origin and a WebSocket client for the
-- tunnel specs (RFC 6455 over LuaSocket; TLS through LuaSec).
--
-- As a script:  luajit spec/helpers/websocket.lua PORT [--tls CERT KEY]
--   One process, one thread: each connection is a coroutine scheduled with
--   socket.select. A GET with Upgrade: websocket and a Sec-WebSocket-Key is
--   answered 101 (Sec-WebSocket-Accept), then every text or binary message
--   (masked, as clients must send them; fragments joined) is echoed back in
--   one unmasked frame, a ping gets its pong, a close its close. When the
--   client ends its sending (EOF after a half-close), the origin sends one
--   last text message "bye" and closes. Paths:
--     /status/NNN   that status instead of the 101 (a plain answer, Content-Length)
--     /hello        the 101, then at once a text message "hello" (before any from the client)
--     /_stats       200 JSON { accepted, open, upgrades, messages } (counting only
--                   the other connections)
-- As a module: require "helpers.websocket" gives the client:
--   local ws = require "helpers.websocket"
--   local c, err = ws.connect(port, { path = "/chat", tls = { ca = pki.ca, sni = "localhost" },
--                                     headers = { ["X-Key"] = "1" }, timeout = 10 })
--   c.status, c.headers (lowercase names), c.head: the handshake's answer (a
--   101 or anything else: then c:close() and look at c.body)
--   c:send(payload [, opcode]): one masked frame (opcode 1 text, 2 binary, 9 ping, 8 close)
--   c:recv([timeout]) -> opcode, payload | nil, "closed" | "timeout"
--   c:shutdown_write(): half-close (plain TCP only); c:close()
--   ws.accept_key(key), ws.frame(payload, opcode, mask_key): the wire pieces
-- Every wait is bounded (timeout, default 10 s).
local socket = require "socket"
local ffi = require "ffi"
local bit = require "bit"

local M = {}

ffi.cdef [[
unsigned char *SHA1(const unsigned char *d, size_t n, unsigned char *md);
]]
local crypto = ffi.load("crypto")

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

local function base64(s)
    local out = {}
    for i = 1, #s, 3 do
        local a, b, c = s:byte(i, i + 2)
        local n = a * 65536 + (b or 0) * 256 + (c or 0)
        local chars = {}
        for k = 3, 0, -1 do
            local v = bit.band(bit.rshift(n, k * 6), 63)
            chars[#chars + 1] = B64:sub(v + 1, v + 1)
        end
        if not b then chars[3], chars[4] = "=", "=" elseif not c then chars[4] = "=" end
        out[#out + 1] = table.concat(chars)
    end
    return table.concat(out)
end

function M.accept_key(key)
    local s = key .. "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    local md = ffi.new("unsigned char[20]")
    crypto.SHA1(s, #s, md)
    return base64(ffi.string(md, 20))
end

-- payload XOR the 4-byte key, through FFI (5 MiB messages stay fast).
local function xor_mask(payload, key)
    local n = #payload
    if n == 0 then return "" end
    local buf = ffi.new("uint8_t[?]", n)
    ffi.copy(buf, payload, n)
    local k0, k1, k2, k3 = key:byte(1, 4)
    local k = { [0] = k0, k1, k2, k3 }
    for i = 0, n - 1 do buf[i] = bit.bxor(buf[i], k[i % 4]) end
    return ffi.string(buf, n)
end

-- One frame, FIN set; masked with mask_key (4 bytes) when given.
function M.frame(payload, opcode, mask_key)
    local n = #payload
    local b2 = mask_key and 128 or 0
    local head
    if n < 126 then
        head = string.char(128 + opcode, b2 + n)
    elseif n < 65536 then
        head = string.char(128 + opcode, b2 + 126, bit.rshift(n, 8), bit.band(n, 255))
    else
        local hi, lo = math.floor(n / 4294967296), n % 4294967296
        head = string.char(128 + opcode, b2 + 127, bit.band(bit.rshift(hi, 24), 255), bit.band(bit.rshift(hi, 16), 255),
            bit.band(bit.rshift(hi, 8), 255), bit.band(hi, 255), bit.band(bit.rshift(lo, 24), 255),
            bit.band(bit.rshift(lo, 16), 255), bit.band(bit.rshift(lo, 8), 255), bit.band(lo, 255))
    end
    if mask_key then return head .. mask_key .. xor_mask(payload, mask_key) end
    return head .. payload
end

-- Parses one frame at the front of buf: fin, opcode, payload (unmasked),
-- the bytes it took; nil when incomplete.
local function parse_frame(buf)
    if #buf < 2 then return nil end
    local b1, b2 = buf:byte(1, 2)
    local fin, opcode, masked, n = b1 >= 128, b1 % 16, b2 >= 128, b2 % 128
    local pos = 3
    if n == 126 then
        if #buf < 4 then return nil end
        local x, y = buf:byte(3, 4)
        n, pos = x * 256 + y, 5
    elseif n == 127 then
        if #buf < 10 then return nil end
        n = 0
        for i = 3, 10 do n = n * 256 + buf:byte(i) end
        pos = 11
    end
    local key
    if masked then
        if #buf < pos + 3 then return nil end
        key, pos = buf:sub(pos, pos + 3), pos + 4
    end
    if #buf < pos + n - 1 then return nil end
    local payload = buf:sub(pos, pos + n - 1)
    if key then payload = xor_mask(payload, key) end
    return fin, opcode, payload, pos + n - 1
end
M.parse_frame = parse_frame

--------------------------------------------------------------------------
-- The client.

local Client = {}
Client.__index = Client

local function deadline_of(t) return socket.gettime() + (t or 10) end

-- More bytes into self.buf, waiting until deadline. true, or nil, "closed" | "timeout".
function Client:fill(deadline)
    while true do
        local left = deadline - socket.gettime()
        if left <= 0 then return nil, "timeout" end
        self.sock:settimeout(math.min(left, 1))
        local data, err, partial = self.sock:receive(65536)
        local got = data or partial
        if got and #got > 0 then
            self.buf = self.buf .. got
            return true
        end
        if err ~= "timeout" and err ~= "wantread" then return nil, "closed" end
    end
end

function Client:send_raw(bytes)
    self.sock:settimeout(10)
    local i = 1
    while i <= #bytes do
        local last, err, partial = self.sock:send(bytes, i)
        if last then i = last + 1 else
            if err ~= "timeout" and err ~= "wantwrite" then return nil, err end
            i = (partial or i - 1) + 1
        end
    end
    return true
end

function Client:send(payload, opcode)
    local key = string.char(math.random(0, 255), math.random(0, 255), math.random(0, 255), math.random(0, 255))
    return self:send_raw(M.frame(payload, opcode or 2, key))
end

-- The next message (fragments joined; pings answered): opcode, payload.
function Client:recv(timeout)
    local deadline, parts, first = deadline_of(timeout or self.timeout), {}, nil
    while true do
        local fin, opcode, payload, used = parse_frame(self.buf)
        if fin ~= nil then
            self.buf = self.buf:sub(used + 1)
            if opcode == 9 then
                self:send(payload, 10)
            elseif opcode >= 8 then
                return opcode, payload
            else
                first = first or opcode
                parts[#parts + 1] = payload
                if fin then return first, table.concat(parts) end
            end
        else
            local ok, err = self:fill(deadline)
            if not ok then return nil, err end
        end
    end
end

function Client:shutdown_write()
    return self.tcp:shutdown("send")
end

function Client:close()
    self.sock:close()
end

function M.connect(port, opts)
    opts = opts or {}
    local tcp, err = socket.connect("127.0.0.1", port)
    if not tcp then return nil, "connect: " .. tostring(err) end
    tcp:setoption("tcp-nodelay", true)
    local c = setmetatable({ tcp = tcp, sock = tcp, buf = "", timeout = opts.timeout or 10 }, Client)
    if opts.tls then
        local ssl = require "ssl"
        local s = assert(ssl.wrap(tcp, { mode = "client", protocol = "any", verify = "peer", cafile = opts.tls.ca,
            options = { "all", "no_sslv3" } }))
        if opts.tls.sni then s:sni(opts.tls.sni) end
        s:settimeout(10)
        local ok, herr = s:dohandshake()
        if not ok then return nil, "TLS handshake: " .. tostring(herr) end
        c.sock = s
    end
    local key = base64(string.char(math.random(0, 255), math.random(0, 255), math.random(0, 255), math.random(0, 255),
        math.random(0, 255), math.random(0, 255), math.random(0, 255), math.random(0, 255), math.random(0, 255),
        math.random(0, 255), math.random(0, 255), math.random(0, 255), math.random(0, 255), math.random(0, 255),
        math.random(0, 255), math.random(0, 255)))
    local lines = { "GET " .. (opts.path or "/") .. " HTTP/1.1", "Host: " .. (opts.host or "localhost"),
        "Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: " .. key }
    for k, v in pairs(opts.headers or {}) do lines[#lines + 1] = k .. ": " .. v end
    local ok, serr = c:send_raw(table.concat(lines, "\r\n") .. "\r\n\r\n" .. (opts.early or ""))
    if not ok then return nil, "send: " .. tostring(serr) end
    local deadline = deadline_of(c.timeout)
    while not c.buf:find("\r\n\r\n", 1, true) do
        local got, ferr = c:fill(deadline)
        if not got then return nil, "handshake answer: " .. tostring(ferr) end
    end
    local e = c.buf:find("\r\n\r\n", 1, true)
    c.head, c.buf = c.buf:sub(1, e + 3), c.buf:sub(e + 4)
    c.status = tonumber(c.head:match("^HTTP/1%.%d (%d%d%d)"))
    c.headers = {}
    for k, v in c.head:gmatch("\r\n([^:\r\n]+):[ \t]*([^\r\n]*)") do c.headers[k:lower()] = v end
    if c.status == 101 and c.headers["sec-websocket-accept"] ~= M.accept_key(key) then
        return nil, "bad Sec-WebSocket-Accept: " .. tostring(c.headers["sec-websocket-accept"])
    end
    if c.status ~= 101 then -- the answer's body, by Content-Length
        local n = tonumber(c.headers["content-length"] or "0") or 0
        while #c.buf < n and c:fill(deadline) do end
        c.body = c.buf:sub(1, n)
    end
    return c
end

--------------------------------------------------------------------------
-- The origin (as a script).

local function origin(argv)
    local port = assert(tonumber(argv[1]), "usage: websocket.lua PORT [--tls CERT KEY]")
    local tls_ctx
    if argv[2] == "--tls" then
        local ssl = require "ssl"
        tls_ctx = assert(ssl.newcontext { mode = "server", protocol = "any", certificate = argv[3], key = argv[4],
            options = { "all", "no_sslv3" } })
    end
    local stats = { accepted = 0, open = 0, upgrades = 0, messages = 0 }
    local waiting = {}

    local function wait(r, w) return coroutine.yield(r, w, socket.gettime() + 30) end

    local function resume(co, ...)
        local ok, r, w, dl = coroutine.resume(co, ...)
        if not ok then io.stderr:write("websocket origin: ", tostring(r), "\n") end
        waiting[co] = coroutine.status(co) ~= "dead" and { r = r, w = w, dl = dl } or nil
    end

    local C = {}
    C.__index = C
    function C:fill()
        while true do
            local data, err, partial = self.sock:receive(65536)
            local got = data or partial
            if got and #got > 0 then self.buf = self.buf .. got return true end
            if err == "wantwrite" then
                if wait(nil, self.sock) == "timeout" then return nil end
            elseif err == "timeout" or err == "wantread" then
                if wait(self.sock, nil) == "timeout" then return nil end
            else
                return nil
            end
        end
    end
    function C:send(data)
        local i = 1
        while i <= #data do
            local last, err, partial = self.sock:send(data, i)
            if last then i = last + 1 else
                if err ~= "timeout" and err ~= "wantwrite" and err ~= "wantread" then return nil end
                i = (partial or i - 1) + 1
                if i <= #data and wait(err == "wantread" and self.sock or nil, err ~= "wantread" and self.sock or nil) == "timeout" then
                    return nil
                end
            end
        end
        return true
    end

    local function serve(tcp, counted)
        local c = setmetatable({ sock = tcp, buf = "" }, C)
        if tls_ctx then
            local ssl = require "ssl"
            c.sock = assert(ssl.wrap(tcp, tls_ctx))
            c.sock:settimeout(0)
            for _ = 1, 100000 do
                local ok, err = c.sock:dohandshake()
                if ok then break end
                if err ~= "wantread" and err ~= "wantwrite" then return end
                if wait(err == "wantread" and c.sock or nil, err == "wantwrite" and c.sock or nil) == "timeout" then return end
            end
        end
        while not c.buf:find("\r\n\r\n", 1, true) do
            if not c:fill() then return end
        end
        local e = c.buf:find("\r\n\r\n", 1, true)
        local head = c.buf:sub(1, e + 3)
        c.buf = c.buf:sub(e + 4)
        local path = head:match("^%u+ (%S+)") or "/"
        local hdr = {}
        for k, v in head:gmatch("\r\n([^:\r\n]+):[ \t]*([^\r\n]*)") do hdr[k:lower()] = v end
        if path == "/_stats" then
            counted()
            local body = string.format('{"accepted":%d,"open":%d,"upgrades":%d,"messages":%d}', stats.accepted,
                stats.open, stats.upgrades, stats.messages)
            c:send("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: " ..
                #body .. "\r\n\r\n" .. body)
            return
        end
        local code = tonumber(path:match("^/status/(%d%d%d)"))
        if code or not (hdr.upgrade or ""):lower():find("websocket", 1, true) or not hdr["sec-websocket-key"] then
            code = code or 400
            local body = "status " .. code .. "\n"
            c:send("HTTP/1.1 " .. code .. " Answer\r\nContent-Type: text/plain\r\nContent-Length: " .. #body ..
                "\r\n\r\n" .. body)
            return
        end
        stats.upgrades = stats.upgrades + 1
        if not c:send("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" ..
                "Sec-WebSocket-Accept: " .. M.accept_key(hdr["sec-websocket-key"]) .. "\r\n\r\n") then return end
        if path == "/hello" and not c:send(M.frame("hello", 1)) then return end
        local parts, first = {}, nil
        while true do
            local fin, opcode, payload, used = parse_frame(c.buf)
            if fin == nil then
                if not c:fill() then -- the client ended its sending: a last word, then close
                    c:send(M.frame("bye", 1))
                    return
                end
            else
                c.buf = c.buf:sub(used + 1)
                if opcode == 8 then
                    c:send(M.frame(payload, 8))
                    return
                elseif opcode == 9 then
                    c:send(M.frame(payload, 10))
                elseif opcode ~= 10 then
                    first = first or opcode
                    parts[#parts + 1] = payload
                    if fin then
                        stats.messages = stats.messages + 1
                        if not c:send(M.frame(table.concat(parts), first)) then return end
                        parts, first = {}, nil
                    end
                end
            end
        end
    end

    local server = assert(socket.bind("127.0.0.1", port, 1024))
    server:settimeout(0)
    io.stdout:write("ready\n")
    io.stdout:flush()
    while true do
        local recvt, sendt = { server }, {}
        for _, wt in pairs(waiting) do
            if wt.r then recvt[#recvt + 1] = wt.r end
            if wt.w then sendt[#sendt + 1] = wt.w end
        end
        local rd, wr = socket.select(recvt, sendt, 0.5)
        if rd[server] then
            for _ = 1, 64 do
                local tcp = server:accept()
                if not tcp then break end
                tcp:settimeout(0)
                tcp:setoption("tcp-nodelay", true)
                stats.accepted = stats.accepted + 1
                stats.open = stats.open + 1
                local uncounted = false
                local co = coroutine.create(function()
                    serve(tcp, function()
                        stats.accepted, stats.open, uncounted = stats.accepted - 1, stats.open - 1, true
                    end)
                    if not uncounted then stats.open = stats.open - 1 end
                    tcp:close()
                end)
                resume(co)
            end
        end
        local now, ready = socket.gettime(), {}
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

if arg and arg[0] and arg[0]:match("websocket%.lua$") and not package.loaded["busted"] then
    origin(arg)
end

return M
