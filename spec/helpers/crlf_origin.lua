-- helpers.crlf_origin: a naive backend for the smuggling specs. It reads
-- lines up to CRLF only (a bare LF is just a byte of the line), ignores chunk
-- extensions (everything after ';' on a size line) and header lines without
-- a colon, as simple servers do, keeps connections alive, and records every
-- request it parses on each connection.
--
-- As a script:  luajit spec/helpers/crlf_origin.lua PORT [--mode reset]
--   --mode reset: after a whole request is read (and recorded), the
--   connection is closed with a TCP reset instead of answered.
-- Endpoints:
--   /_log      200 JSON list of the requests parsed so far (not /_log itself),
--              in order: {conn, seq, method, target, version, headers =
--              [[name, value]...], body (decoded), framing (the body's bytes as
--              received, chunked framing included), trailers = [raw lines]}
--   anything else  200 JSON {target, conn, seq, body_len}, Content-Length.
-- Every loop is bounded: a connection buffer over 4 MiB is dropped.
local socket = require "socket"
local cjson = require "cjson.safe"

local port = assert(tonumber(arg[1]), "usage: crlf_origin.lua PORT [--mode reset]")
local mode = arg[2] == "--mode" and arg[3] or "ok"

local server = assert(socket.bind("127.0.0.1", port, 64))
server:settimeout(0)

local conns = {} -- socket -> {id, buf, seq}
local log = {}
local next_id = 0

-- A CRLF-terminated line at pos, or nil when it has not arrived.
local function line_at(buf, pos)
    local e = buf:find("\r\n", pos, true)
    if not e then return nil end
    return buf:sub(pos, e - 1), e + 2
end

-- Parses a chunked body the naive way from pos: returns body, framing,
-- trailers, next position; or nil when incomplete.
local function chunked(buf, pos)
    local start, parts, trailers = pos, {}, {}
    for _ = 1, 100000 do
        local line, nxt = line_at(buf, pos)
        if not line then return nil end
        local size = tonumber(line:match("^([^;]*)"):match("^%s*(.-)%s*$"), 16)
        if not size then return nil, "bad size line " .. line end
        pos = nxt
        if size == 0 then
            for _ = 1, 10000 do
                local t, after = line_at(buf, pos)
                if not t then return nil end
                pos = after
                if t == "" then
                    return table.concat(parts), buf:sub(start, pos - 1), trailers, pos
                end
                trailers[#trailers + 1] = t
            end
            return nil, "too many trailers"
        end
        if #buf < pos + size + 1 then return nil end
        parts[#parts + 1] = buf:sub(pos, pos + size - 1)
        pos = pos + size
        if buf:sub(pos, pos + 1) ~= "\r\n" then return nil, "no CRLF after data" end
        pos = pos + 2
    end
    return nil, "too many chunks"
end

-- Parses one request from c.buf; returns it and the rest, or nil.
local function parse(c)
    local buf = c.buf
    local e = buf:find("\r\n\r\n", 1, true)
    if not e then return nil end
    local lines = {}
    for l in (buf:sub(1, e + 1)):gmatch("(.-)\r\n") do lines[#lines + 1] = l end
    local method, target, version = (lines[1] or ""):match("^(%S+) (%S+) (%S+)$")
    local req = { method = method, target = target, version = version, headers = {}, trailers = {} }
    local cl, te
    for i = 2, #lines do
        local n, v = lines[i]:match("^([^:]+):%s*(.-)%s*$")
        if n then
            req.headers[#req.headers + 1] = { n, v }
            if n:lower() == "content-length" then cl = tonumber(v) end
            if n:lower() == "transfer-encoding" then te = v:lower() end
        end
    end
    local pos = e + 4
    if te and te:find("chunked", 1, true) then
        local body, framing, trailers, nxt = chunked(buf, pos)
        if not body then
            if framing then return "error" end
            return nil
        end
        req.body, req.framing, req.trailers, pos = body, framing, trailers, nxt
    else
        cl = cl or 0
        if #buf < pos + cl - 1 then return nil end
        req.body = buf:sub(pos, pos + cl - 1)
        req.framing = req.body
        pos = pos + cl
    end
    c.buf = buf:sub(pos)
    return req
end

local function respond(sock, body)
    sock:settimeout(5)
    sock:send("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " .. #body .. "\r\n\r\n" .. body)
    sock:settimeout(0)
end

local function close(sock)
    conns[sock] = nil
    sock:close()
end

-- Serves every complete request in c.buf. Returns false when sock was closed.
local function serve(sock, c)
    for _ = 1, 1000 do
        local req = parse(c)
        if req == "error" then close(sock) return false end
        if not req then return true end
        if req.target == "/_log" then
            respond(sock, cjson.encode(log))
        else
            c.seq = c.seq + 1
            req.conn, req.seq = c.id, c.seq
            log[#log + 1] = req
            if mode == "reset" then
                sock:setoption("linger", { on = true, timeout = 0 })
                close(sock)
                return false
            end
            respond(sock, cjson.encode { target = req.target, conn = c.id, seq = c.seq, body_len = #req.body })
        end
    end
    return true
end

while true do
    local list = { server }
    for s in pairs(conns) do list[#list + 1] = s end
    local readable = socket.select(list, nil, 1)
    for _, s in ipairs(readable or {}) do
        if s == server then
            local cs = server:accept()
            if cs then
                cs:settimeout(0)
                next_id = next_id + 1
                conns[cs] = { id = next_id, buf = "", seq = 0 }
            end
        elseif conns[s] then
            local c = conns[s]
            local data, err, partial = s:receive(65536)
            local got = data or partial
            if got and #got > 0 then c.buf = c.buf .. got end
            if #c.buf > 4 * 1048576 then
                close(s)
            elseif serve(s, c) and err and err ~= "timeout" then
                close(s)
            end
        end
    end
end
