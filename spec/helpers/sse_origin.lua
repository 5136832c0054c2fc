-- helpers.sse_origin: a server-sent events origin for spec/e2e/compress_spec.lua.
--   luajit spec/helpers/sse_origin.lua PORT FLAG
-- Serves one connection at a time (one that closes before a whole request
-- head, like a port probe, gets nothing): any request gets a chunked
-- text/event-stream answer of three events. The first goes at once; the
-- second waits for the file FLAG to exist (the spec creates it once the
-- first event reached it through the proxy; at most 5 s) and 200 ms more;
-- the third 200 ms after that; then the last chunk.
local socket = require "socket"

local port, flag = tonumber(arg[1]), arg[2]
local srv = assert(socket.bind("127.0.0.1", port))

local function exists(path)
    local f = io.open(path, "rb")
    if f then f:close() end
    return f ~= nil
end

local function chunk(s)
    return string.format("%x\r\n", #s) .. s .. "\r\n"
end

while true do
    local c = srv:accept()
    local line, lines = nil, 0
    if c then
        c:settimeout(5)
        repeat
            line = c:receive("*l")
            lines = lines + 1
        until not line or line == ""
    end
    if c and line == "" and lines > 1 then -- a probe that connects and closes gets nothing
        c:send("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            .. "Transfer-Encoding: chunked\r\n\r\n")
        c:send(chunk("data: event one\n\n"))
        local deadline = socket.gettime() + 5
        while not exists(flag) and socket.gettime() < deadline do socket.sleep(0.01) end
        socket.sleep(0.2)
        c:send(chunk("data: event two\n\n"))
        socket.sleep(0.2)
        c:send(chunk("data: event three\n\n") .. "0\r\n\r\n")
    end
    if c then c:close() end
end
