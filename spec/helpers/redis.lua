-- helpers.redis: a real redis-server (Debian's, scripts/deps.sh) on a free
-- 127.0.0.1 port with persistence off, stopped by PID; and the Redis client's
-- test driver (spec/c/redis_driver.c, built beside the binary) run on a script.
--
--   local rh = require "helpers.redis"
--   local server = rh.start { password = "s3cret" }     -- server.addr, server.port
--   local out = rh.drive("client ${addr}\ncall PING\n", { addr = server.addr })
--   -- out.lines = { "client 127.0.0.1:PORT", "+PONG" }, out.code = 0, out.stderr
--   server:restart()                                     -- same port, empty data
--   server:cmd("INCR", "k")                             -- one command on a connection of its own
--   server:stop()
--   rh.start { host = "127.0.0.2", port = P }            -- another loopback address; "::1": IPv6
local h = require "helpers.proxy"
local socket = require "socket"

local M = {}

local Server = {}
Server.__index = Server

local function tcp_to(host, port)
    local s = host:find(":", 1, true) and socket.tcp6() or socket.tcp()
    s:settimeout(1)
    if s:connect(host, port) ~= 1 then
        s:close()
        return nil
    end
    return s
end

-- Whether a redis-server answers on host:port: PING gets +PONG, or -NOAUTH
-- when it wants a password.
local function answers(host, port)
    local s = host:find(":", 1, true) and socket.tcp6() or socket.tcp()
    s:settimeout(0.5)
    local ok = s:connect(host, port)
    if ok ~= 1 then
        s:close()
        return false
    end
    s:send("PING\r\n")
    local line = s:receive("*l")
    s:close()
    return line == "+PONG" or (line or ""):match("^%-NOAUTH") ~= nil
end

function Server:_spawn()
    local argv = { "redis-server", "--port", tostring(self.port), "--bind", self.host, "--save", "",
        "--appendonly", "no", "--daemonize", "no", "--dir", self.dir, "--logfile", "" }
    if self.password then
        argv[#argv + 1] = "--requirepass"
        argv[#argv + 1] = self.password
    end
    self.proc = h.spawn(argv)
    local deadline = socket.gettime() + 10
    while not answers(self.host, self.port) do
        if not self.proc:alive() then
            error(string.format("redis-server exited (code %s) before answering on %d:\n%s%s",
                tostring(self.proc.code), self.port, self.proc:stdout(), self.proc:stderr()), 3)
        end
        if socket.gettime() >= deadline then
            self.proc:stop(2)
            error(string.format("redis-server not answering on %d after 10 s:\n%s", self.port, self.proc:stdout()), 3)
        end
        socket.sleep(0.02)
    end
    self.pid = self.proc.pid
end

-- Starts redis-server; opts.password: requirepass; opts.port: that port;
-- opts.host: the address it binds (default 127.0.0.1).
function M.start(opts)
    opts = opts or {}
    local s = setmetatable({ port = opts.port or h.free_port(), password = opts.password,
                             host = opts.host or "127.0.0.1" }, Server)
    s.addr = (s.host:find(":", 1, true) and "[" .. s.host .. "]" or s.host) .. ":" .. s.port
    s.dir = h.tmpname() .. ".d"
    assert(os.execute("mkdir -p " .. h.quote(s.dir)) == 0)
    s:_spawn()
    return s
end

-- Stops it by PID (SIGTERM, then SIGKILL past 5 s). Idempotent.
function Server:stop()
    if self.proc then
        self.proc:stop(5)
        self.proc = nil
    end
end

-- Starts it again on the same port (after stop; stops it first otherwise).
function Server:start()
    self:stop()
    self:_spawn()
end

function Server:restart()
    self:start()
end

-- One command (after AUTH when the server has a password) on a connection of
-- its own: a status or bulk string, an integer as a number, a flat array as
-- a list, nil for a nil reply; nil, "ERR ..." for an error or no connection.
function Server:cmd(...)
    local s = tcp_to(self.host, self.port)
    if not s then return nil, "cannot connect to " .. self.addr end
    local function send(args)
        local out = { "*" .. #args .. "\r\n" }
        for _, a in ipairs(args) do
            a = tostring(a)
            out[#out + 1] = "$" .. #a .. "\r\n" .. a .. "\r\n"
        end
        s:send(table.concat(out))
    end
    local function read()
        local line = s:receive("*l")
        if not line then return nil, "no reply" end
        local t, rest = line:sub(1, 1), line:sub(2)
        if t == "+" then return rest end
        if t == "-" then return nil, rest end
        if t == ":" then return tonumber(rest) end
        if t == "$" then
            if tonumber(rest) < 0 then return nil end
            local body = s:receive(tonumber(rest) + 2)
            return body and body:sub(1, -3)
        end
        if t == "*" then
            local list = {}
            for i = 1, math.max(tonumber(rest), 0) do list[i] = read() end
            return list
        end
        return nil, "bad reply " .. line
    end
    if self.password then
        send { "AUTH", self.password }
        read()
    end
    send { ... }
    local v, err = read()
    s:close()
    return v, err
end

-- Removes the working directory (call after stop, from lazy_teardown).
function Server:cleanup()
    self:stop()
    os.execute("rm -rf " .. h.quote(self.dir))
end

-- The driver binary: redis_driver beside MOONPROXY_BIN.
function M.driver()
    return (h.bin():match("^(.*)/[^/]*$") or ".") .. "/redis_driver"
end

-- Starts the driver on script (${name} replaced from vars) and returns its
-- process; M.result reads what it printed once it exited.
function M.spawn_driver(script, vars)
    local path = h.write_file(h.tmpname(".redis"), h.expand_template(script, vars or {}))
    return h.spawn { M.driver(), path }
end

-- Waits (bounded, default 30 s) for the driver to exit: { lines, code, stderr }.
function M.result(proc, timeout)
    local code, sig = proc:wait(timeout or 30)
    if code == nil and not sig then
        proc:stop(2)
        error("redis_driver did not exit in time; it printed:\n" .. proc:stdout() .. proc:stderr(), 2)
    end
    local lines = {}
    for l in proc:stdout():gmatch("[^\n]+") do lines[#lines + 1] = l end
    return { lines = lines, code = code, signal = sig, stderr = proc:stderr(), text = proc:stdout() }
end

-- Runs the driver on script to its end.
function M.drive(script, vars, timeout)
    return M.result(M.spawn_driver(script, vars), timeout)
end

return M
