-- helpers.raw_http: a byte-exact HTTP/1.1 client over luasocket for the e2e specs.
-- It sends exactly the bytes it is given (whole, or in pieces with pauses) and
-- reads responses framed by Content-Length, chunked or close, HEAD/1xx/204/304
-- aware. Every read has a deadline; nothing blocks longer than its timeout.
--
--   local raw = require "helpers.raw_http"
--   local c = assert(raw.connect(port))
--   c:send(raw.build { method = "GET", target = "/x", headers = { host = "a" } })
--   local res = assert(c:read_response())       -- res.status, res:header("x"), res.body
--   local list = raw.pipeline(c, { req1, req2 }) -- send at once, read in order
--   c:close()
local socket = require "socket"

local M = {}
M.DEFAULT_TIMEOUT = 5

local Conn = {}
Conn.__index = Conn

local Response = {}
Response.__index = Response

-- First value of a header (case-insensitive), or nil.
function Response:header(name)
    name = name:lower()
    for _, h in ipairs(self.headers) do
        if h[1]:lower() == name then return h[2] end
    end
end

-- Every value of a header, in order.
function Response:header_all(name)
    local t = {}
    name = name:lower()
    for _, h in ipairs(self.headers) do
        if h[1]:lower() == name then t[#t + 1] = h[2] end
    end
    return t
end

-- Whether a comma-separated header (Connection...) holds token.
function Response:has_token(name, token)
    for _, v in ipairs(self:header_all(name)) do
        for t in v:gmatch("[^,]+") do
            if t:match("^%s*(.-)%s*$"):lower() == token:lower() then return true end
        end
    end
    return false
end

function M.connect(port, opts)
    opts = opts or {}
    local sock = socket.tcp()
    sock:settimeout(opts.timeout or M.DEFAULT_TIMEOUT)
    local ok, err = sock:connect(opts.host or "127.0.0.1", port)
    if not ok then
        sock:close()
        return nil, err
    end
    sock:setoption("tcp-nodelay", true)
    return setmetatable({ sock = sock, buf = "", timeout = opts.timeout or M.DEFAULT_TIMEOUT }, Conn)
end

-- Sends data completely (within the connection timeout). Returns true or nil, err.
function Conn:send(data)
    self.sock:settimeout(self.timeout)
    local i = 1
    while i <= #data do
        local last, err, lastpart = self.sock:send(data, i)
        if not last then return nil, err, lastpart end
        i = last + 1
    end
    return true
end

-- Sends each piece with a pause (seconds) between them.
function Conn:send_pieces(pieces, pause)
    for i, p in ipairs(pieces) do
        if i > 1 and pause and pause > 0 then socket.sleep(pause) end
        local ok, err = self:send(p)
        if not ok then return nil, err end
    end
    return true
end

-- Appends whatever the socket has to self.buf, waiting until deadline.
-- Returns true, or nil and "closed" | "timeout" | a socket error.
function Conn:fill(deadline)
    if self.eof then return nil, self.eof end
    while true do
        self.sock:settimeout(0)
        local data, err, partial = self.sock:receive(65536)
        local got = data or partial
        if err and err ~= "timeout" then self.eof = err end
        if got and #got > 0 then
            self.buf = self.buf .. got
            return true
        end
        if self.eof then return nil, self.eof end
        local left = deadline - socket.gettime()
        if left <= 0 then return nil, "timeout" end
        socket.select({ self.sock }, nil, left)
    end
end

function Conn:read_line(deadline, limit)
    while true do
        local nl = self.buf:find("\n", 1, true)
        if nl then
            local line = self.buf:sub(1, nl - 1):gsub("\r$", "")
            self.buf = self.buf:sub(nl + 1)
            return line
        end
        if #self.buf > (limit or 1048576) then return nil, "line too long" end
        local ok, err = self:fill(deadline)
        if not ok then return nil, err end
    end
end

-- Passes n bytes to sink(piece).
function Conn:read_exact(n, deadline, sink)
    while n > 0 do
        if #self.buf == 0 then
            local ok, err = self:fill(deadline)
            if not ok then return nil, err end
        end
        local piece = self.buf
        if #piece > n then
            piece = self.buf:sub(1, n)
            self.buf = self.buf:sub(n + 1)
        else
            self.buf = ""
        end
        sink(piece)
        n = n - #piece
    end
    return true
end

local function no_body_status(status)
    return (status >= 100 and status < 200) or status == 204 or status == 304
end

-- Reads one response. opts: method ("HEAD": no body), timeout (seconds, for
-- the whole response), sink (function(piece): the body is streamed to it and
-- res.body stays nil), interim (true: return a 1xx response itself instead of
-- skipping it; skipped ones are listed in res.interim).
-- Returns res {version, status, reason, status_line, headers = {{name, value}},
-- raw_head, body, body_len, chunked, close_delimited, trailers, interim}, or
-- nil, err, partial (what was read so far).
function Conn:read_response(opts)
    opts = opts or {}
    local deadline = socket.gettime() + (opts.timeout or self.timeout)
    local interim = {}
    while true do
        local res = setmetatable({ headers = {}, trailers = {}, interim = interim, body_len = 0 }, Response)
        local head_lines = {}
        while true do
            local line, err = self:read_line(deadline, 1048576)
            if not line then
                if #head_lines == 0 and err == "closed" and #self.buf == 0 then
                    return nil, "closed"
                end
                return nil, err, res
            end
            if line == "" then
                if #head_lines > 0 then break end
            else
                head_lines[#head_lines + 1] = line
            end
        end
        res.raw_head = table.concat(head_lines, "\r\n") .. "\r\n\r\n"
        res.status_line = head_lines[1]
        local version, status, reason = head_lines[1]:match("^(HTTP/%d%.%d) (%d%d%d) ?(.*)$")
        if not version then return nil, "bad status line: " .. head_lines[1], res end
        res.version, res.status, res.reason = version, tonumber(status), reason
        for i = 2, #head_lines do
            local n, v = head_lines[i]:match("^([^:]+):[ \t]*(.-)[ \t]*$")
            if not n then return nil, "bad header line: " .. head_lines[i], res end
            res.headers[#res.headers + 1] = { n, v }
        end
        if res.status >= 100 and res.status < 200 and not opts.interim then
            interim[#interim + 1] = res
        else
            local ok, err = self:read_body(res, opts, deadline)
            if not ok then return nil, err, res end
            return res
        end
    end
end

function Conn:read_body(res, opts, deadline)
    local parts = {}
    local sink = function(piece)
        res.body_len = res.body_len + #piece
        if opts.sink then opts.sink(piece) else parts[#parts + 1] = piece end
    end
    local te, cl = res:header("transfer-encoding"), res:header("content-length")
    if opts.method == "HEAD" or no_body_status(res.status) then
        -- RFC 9112 §6.3: no body whatever the headers say
    elseif te and te:lower():match("chunked%s*$") then
        res.chunked = true
        while true do
            local line, err = self:read_line(deadline, 4096)
            if not line then return nil, err end
            local size = tonumber(line:match("^(%x+)"), 16)
            if not size then return nil, "bad chunk size line: " .. line end
            if size == 0 then break end
            local ok, rerr = self:read_exact(size, deadline, sink)
            if not ok then return nil, rerr end
            local crlf, cerr = self:read_line(deadline, 4096)
            if crlf ~= "" then return nil, cerr or "no CRLF after chunk" end
        end
        while true do
            local line, err = self:read_line(deadline, 65536)
            if not line then return nil, err end
            if line == "" then break end
            res.trailers[#res.trailers + 1] = line
        end
    elseif cl then
        local n = tonumber(cl)
        if not n then return nil, "bad content-length " .. cl end
        local ok, err = self:read_exact(n, deadline, sink)
        if not ok then return nil, err end
    else
        res.close_delimited = true
        while true do
            if #self.buf > 0 then
                sink(self.buf)
                self.buf = ""
            end
            local ok, err = self:fill(deadline)
            if not ok then
                if err == "closed" then break end
                return nil, err
            end
        end
    end
    if not opts.sink then res.body = table.concat(parts) end
    return true
end

-- Waits up to timeout seconds for the server to close the connection.
-- Returns true when it did (after the bytes already buffered), false and the
-- bytes received otherwise.
function Conn:wait_closed(timeout)
    local deadline = socket.gettime() + (timeout or self.timeout)
    local before = #self.buf
    while true do
        local ok, err = self:fill(deadline)
        if not ok then
            if err == "timeout" then return false, self.buf:sub(before + 1) end
            return #self.buf == before, self.buf:sub(before + 1)
        end
    end
end

function Conn:close()
    if self.sock then
        self.sock:close()
        self.sock = nil
    end
end

-- Request bytes. req: method (GET), target (/), version (HTTP/1.1), headers
-- (a list of {name, value} kept in order, or a map; Host: localhost is added
-- unless a host is given or no_host is set), body (a string; Content-Length
-- is added unless a content-length or transfer-encoding header is given).
function M.build(req)
    local headers = {}
    local have = {}
    if req.headers and req.headers[1] then
        for _, h in ipairs(req.headers) do
            headers[#headers + 1] = h
            have[h[1]:lower()] = true
        end
    else
        local names = {}
        for n in pairs(req.headers or {}) do names[#names + 1] = n end
        table.sort(names)
        for _, n in ipairs(names) do
            headers[#headers + 1] = { n, req.headers[n] }
            have[n:lower()] = true
        end
    end
    if not have.host and not req.no_host then table.insert(headers, 1, { "Host", "localhost" }) end
    if req.body and not have["content-length"] and not have["transfer-encoding"] then
        headers[#headers + 1] = { "Content-Length", tostring(#req.body) }
    end
    local out = { (req.method or "GET") .. " " .. (req.target or "/") .. " " .. (req.version or "HTTP/1.1") .. "\r\n" }
    for _, h in ipairs(headers) do out[#out + 1] = h[1] .. ": " .. h[2] .. "\r\n" end
    out[#out + 1] = "\r\n"
    out[#out + 1] = req.body or ""
    return table.concat(out)
end

-- One request on a connection: build (if req is a table), send, read.
function Conn:request(req, opts)
    opts = opts or {}
    local bytes = type(req) == "table" and M.build(req) or req
    local ok, err = self:send(bytes)
    if not ok then return nil, "send: " .. tostring(err) end
    if type(req) == "table" and req.method == "HEAD" and not opts.method then
        opts.method = "HEAD"
    end
    return self:read_response(opts)
end

-- One request on a new connection, closed afterwards.
function M.request(port, req, opts)
    local c, err = M.connect(port, opts)
    if not c then return nil, "connect: " .. tostring(err) end
    local res, rerr, partial = c:request(req, opts)
    c:close()
    return res, rerr, partial
end

function M.get(port, target, headers, opts)
    return M.request(port, { method = "GET", target = target, headers = headers }, opts)
end

-- Sends every request at once, then reads as many responses, in order.
-- reqs are tables (built with M.build) or strings. Returns the list of
-- responses, or nil, err, the responses read so far.
function M.pipeline(conn, reqs, opts)
    local bytes = {}
    for i, r in ipairs(reqs) do bytes[i] = type(r) == "table" and M.build(r) or r end
    local ok, err = conn:send(table.concat(bytes))
    if not ok then return nil, "send: " .. tostring(err), {} end
    local out = {}
    for i, r in ipairs(reqs) do
        local o = {}
        for k, v in pairs(opts or {}) do o[k] = v end
        if type(r) == "table" and r.method == "HEAD" then o.method = "HEAD" end
        local res, rerr = conn:read_response(o)
        if not res then return nil, "response " .. i .. ": " .. tostring(rerr), out end
        out[#out + 1] = res
    end
    return out
end

return M
