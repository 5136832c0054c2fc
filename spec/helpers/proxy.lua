-- helpers.proxy: start and stop the real moonproxy binary and the fake origin
-- (helpers/origin.lua) for the e2e specs; eventually(); free ports; RSS.
--
-- Processes are children of the busted process (fork + execvp through the
-- FFI), so stop() gets their real exit status. A child gets /dev/null as
-- stdin, its stdout and stderr go to temp files, it inherits no other file
-- descriptor (a test's sockets stay the test's) and SIGPIPE is reset to its
-- default. Every child is stopped by PID in stop(); the ones a failed spec left
-- behind are killed when the Lua state closes.
--
--   local h = require "helpers.proxy"
--   local origin = h.start_origin("a")                    -- origin.port, origin:stats()
--   local proxy = h.start_proxy { workers = 1, vars = { a = origin.addr }, config = [[
--     local proxy = require "moonproxy"
--     proxy.listen { addr = "${listen}" }
--     proxy.settings { access_log = "${access_log}" }
--     proxy.route { prefix = "/", upstream = proxy.upstream "a" { servers = { "${a}" } } }
--   ]] }
--   ... proxy.port ...
--   origin:mode("503")                 -- failure injection: "reset", "stall", "slow:200"...
--   local results, counts = h.load(proxy.port, { total = 1000, concurrency = 8 })
--   proxy:server_state("a", origin.addr).circuit   -- GET /upstreams (needs ${admin})
--   proxy:stop(); origin:stop()
local bit = require "bit"
local ffi = require "ffi"
local socket = require "socket"
local cjson = require "cjson"
local raw = require "helpers.raw_http"

pcall(ffi.cdef, [[
int fork(void);
int execvp(const char *file, char *const argv[]);
int waitpid(int pid, int *status, int options);
void _exit(int status);
int open(const char *path, int flags, int mode);
int dup2(int oldfd, int newfd);
int close(int fd);
int kill(int pid, int sig);
typedef void (*mp_test_sighandler_t)(int);
mp_test_sighandler_t signal(int signum, mp_test_sighandler_t handler);
]])
local C = ffi.C

local M = {}

local O_WRONLY_CREAT_TRUNC = 577 -- O_WRONLY | O_CREAT | O_TRUNC on Linux
local WNOHANG = 1
local SIG = { HUP = 1, INT = 2, KILL = 9, TERM = 15, PIPE = 13 }
M.SIG = SIG

local HERE = (debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$")) or "spec/helpers"
M.ORIGIN_SCRIPT = HERE .. "/origin.lua"

function M.bin()
    local b = os.getenv("MOONPROXY_BIN")
    if b and b ~= "" then return b end
    return "build/moonproxy"
end

-- Polls fn (every interval s, default 0.02) until it returns a truthy value,
-- which is returned; raises after timeout seconds (default 5). Errors raised
-- by fn count as "not yet" and the last one is reported.
function M.eventually(fn, timeout, interval)
    timeout = timeout or 5
    local deadline = socket.gettime() + timeout
    local last
    for _ = 1, 1000000 do
        local ok, v = pcall(fn)
        if ok and v then return v end
        last = ok and tostring(v) or v
        if socket.gettime() >= deadline then break end
        socket.sleep(interval or 0.02)
    end
    error(string.format("eventually: not true within %.1fs (last: %s)", timeout, tostring(last)), 2)
end

-- A port nothing listens on right now (bind 127.0.0.1:0, read it, close),
-- and not one this process was given before: the kernel may hand the same
-- free port to two binds in a row, and a spec asking for two ports (a
-- listener and the admin port) would get one twice.
local given = {}
function M.free_port()
    for _ = 1, 50 do
        local s = assert(socket.bind("127.0.0.1", 0))
        local _, port = s:getsockname()
        s:close()
        port = tonumber(port)
        if not given[port] then
            given[port] = true
            return port
        end
    end
    error("free_port: no port not handed out before in 50 tries")
end

function M.port_open(port)
    local s = socket.tcp()
    s:settimeout(0.5)
    local ok = s:connect("127.0.0.1", port)
    s:close()
    return ok == 1
end

local temp_files = {}

-- A fresh temp file name ending in suffix; removed at cleanup().
function M.tmpname(suffix)
    local base = os.tmpname() -- creates the file
    temp_files[#temp_files + 1] = base
    local name = base .. (suffix or "")
    if suffix then temp_files[#temp_files + 1] = name end
    return name
end

function M.write_file(path, text)
    local f = assert(io.open(path, "wb"))
    f:write(text)
    f:close()
    return path
end

function M.read_file(path)
    local f = io.open(path, "rb")
    if not f then return nil end
    local s = f:read("*a")
    f:close()
    return s
end

--------------------------------------------------------------------------
-- Processes.

local Proc = {}
Proc.__index = Proc
local live = {} -- pid -> Proc, for the last-chance cleanup

local function decode_status(st)
    local sig = bit.band(st, 0x7f)
    if sig == 0 then return bit.band(bit.rshift(st, 8), 0xff), nil end
    return nil, sig
end

-- Starts argv (a list of strings) as a child; stdout and stderr go to files.
function M.spawn(argv, opts)
    opts = opts or {}
    local out = opts.stdout or M.tmpname(".out")
    local err = opts.stderr or M.tmpname(".err")
    local cargv = ffi.new("char *[?]", #argv + 1)
    local keep = {}
    for i, a in ipairs(argv) do
        keep[i] = ffi.new("char[?]", #a + 1, a)
        cargv[i - 1] = keep[i]
    end
    cargv[#argv] = nil
    io.stdout:flush()
    io.stderr:flush()
    local pid = C.fork()
    if pid == 0 then
        C.dup2(C.open("/dev/null", 0, 0), 0)
        C.dup2(C.open(out, O_WRONLY_CREAT_TRUNC, 420), 1)
        C.dup2(C.open(err, O_WRONLY_CREAT_TRUNC, 420), 2)
        for fd = 3, 4095 do C.close(fd) end
        C.signal(SIG.PIPE, nil) -- SIG_DFL: luasocket ignores it in the parent
        C.execvp(cargv[0], cargv)
        C._exit(127)
    end
    assert(pid > 0, "fork failed")
    local p = setmetatable({ pid = pid, argv = argv, out_path = out, err_path = err, keep = keep }, Proc)
    live[pid] = p
    return p
end

-- Reaps the child if it exited. Returns true while it runs.
function Proc:alive()
    if self.exited then return false end
    local st = ffi.new("int[1]")
    local r = C.waitpid(self.pid, st, WNOHANG)
    if r == 0 then return true end
    self.exited = true
    live[self.pid] = nil
    if r == self.pid then
        self.code, self.signal = decode_status(st[0])
    end
    return false
end

function Proc:kill(sig)
    if self:alive() then C.kill(self.pid, SIG[sig] or sig) end
end

-- Waits (bounded) for the exit. Returns the exit code (nil if killed by a
-- signal, see self.signal), or nil, "timeout".
function Proc:wait(timeout)
    local deadline = socket.gettime() + (timeout or 10)
    while self:alive() do
        if socket.gettime() >= deadline then return nil, "timeout" end
        socket.sleep(0.01)
    end
    return self.code, self.signal
end

-- SIGTERM, wait up to timeout (default 10 s), then SIGKILL. Returns the exit
-- code (nil when it had to be killed or died of a signal) and the signal.
function Proc:stop(timeout)
    if not self.exited then
        self:kill("TERM")
        local code = self:wait(timeout or 10)
        if code == nil and not self.exited then
            self:kill("KILL")
            self:wait(5)
        end
    end
    return self.code, self.signal
end

function Proc:stdout()
    return M.read_file(self.out_path) or ""
end

function Proc:stderr()
    return M.read_file(self.err_path) or ""
end

-- Last-chance cleanup when the Lua state closes (a spec that died in setup).
M._reaper = newproxy(true)
getmetatable(M._reaper).__gc = function()
    for pid, p in pairs(live) do
        if p:alive() then C.kill(pid, SIG.KILL) end
        p:wait(2)
    end
    for _, f in ipairs(temp_files) do os.remove(f) end
end

-- Removes the temp files made so far (call from lazy_teardown).
function M.cleanup()
    for _, f in ipairs(temp_files) do os.remove(f) end
    temp_files = {}
end

-- Runs a short command line (shell words already quoted) with a time limit.
-- Returns the combined stdout+stderr and the exit status.
function M.run(cmdline, timeout)
    local f = io.popen(string.format("timeout -k 2 %d %s 2>&1; echo \"__rc=$?\"", timeout or 10, cmdline))
    local out = f:read("*a")
    f:close()
    local body, rc = out:match("^(.*)__rc=(%d+)%s*$")
    return body or out, tonumber(rc)
end

function M.quote(s)
    return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- CPU time (user + system, seconds) a process used so far, from /proc/PID/stat.
local clk_tck
function M.cpu_seconds(pid)
    if not clk_tck then
        local out = M.run("getconf CLK_TCK", 5)
        clk_tck = tonumber(out:match("%d+")) or 100
    end
    local s = assert(M.read_file("/proc/" .. pid .. "/stat"), "no /proc/" .. pid .. "/stat")
    local rest = s:match("^%d+ %b() (.*)$") -- the name may hold spaces
    local f = {}
    for x in rest:gmatch("%S+") do f[#f + 1] = x end
    -- fields 14 and 15 of stat(5); rest starts at field 3
    return (tonumber(f[12]) + tonumber(f[13])) / clk_tck
end

-- The share of one core (0..n) pid used over the next `seconds` (bounded).
function M.cpu_share(pid, seconds)
    local c0, t0 = M.cpu_seconds(pid), socket.gettime()
    socket.sleep(seconds)
    return (M.cpu_seconds(pid) - c0) / (socket.gettime() - t0)
end

-- Resident set size of a process in KiB (from /proc/PID/status), or nil.
function M.rss_kb(pid)
    local s = M.read_file("/proc/" .. pid .. "/status")
    return s and tonumber(s:match("VmRSS:%s*(%d+)"))
end

local function wait_listening(proc, port, timeout, what)
    local deadline = socket.gettime() + timeout
    while true do
        if not proc:alive() then
            error(string.format("%s exited (code %s, signal %s) before listening on %d:\n%s%s",
                what, tostring(proc.code), tostring(proc.signal), port, proc:stdout(), proc:stderr()), 3)
        end
        if M.port_open(port) then return end
        if socket.gettime() >= deadline then
            proc:stop(2)
            error(string.format("%s not listening on %d after %ds:\n%s", what, port, timeout, proc:stderr()), 3)
        end
        socket.sleep(0.02)
    end
end

--------------------------------------------------------------------------
-- The origin.

local Origin = setmetatable({}, { __index = Proc })
Origin.__index = Origin

-- Starts helpers/origin.lua on a free port. opts.idle: idle close (seconds);
-- opts.mode: the failure mode it starts in (see Origin:mode); opts.args: more
-- arguments (--tls ...); opts.get: what Origin:stats and Origin:mode fetch
-- with (raw.get's arguments; helpers/tls.lua's origins speak TLS).
function M.start_origin(name, opts)
    opts = opts or {}
    local port = opts.port or M.free_port()
    local argv = { "luajit", M.ORIGIN_SCRIPT, tostring(port), name or "origin" }
    if opts.idle then
        argv[#argv + 1] = "--idle"
        argv[#argv + 1] = tostring(opts.idle)
    end
    if opts.mode then
        argv[#argv + 1] = "--mode"
        argv[#argv + 1] = tostring(opts.mode)
    end
    for _, a in ipairs(opts.args or {}) do argv[#argv + 1] = a end
    local o = setmetatable(M.spawn(argv), Origin)
    o.port, o.name, o.addr, o.get = port, name, "127.0.0.1:" .. port, opts.get or raw.get
    wait_listening(o, port, 10, "origin " .. tostring(name))
    return o
end

-- The origin's counters (see origin.lua: /_stats), fetched directly.
function Origin:stats()
    local res, err = self.get(self.port, "/_stats", nil, { timeout = 5 })
    assert(res, "origin /_stats: " .. tostring(err))
    assert(res.status == 200, "origin /_stats status " .. tostring(res.status))
    return cjson.decode(res.body)
end

-- Switches the origin's failure mode (origin.lua: /_mode): "ok", "503" (any
-- status), "reset", "close", "stall", "slow:N" (ms), "partial"; health (optional)
-- gives the path /health its own mode ("follow": the main one). Returns the
-- modes now in force.
function Origin:mode(set, health)
    local q = {}
    if set then q[#q + 1] = "set=" .. set end
    if health then q[#q + 1] = "health=" .. health end
    local res, err = self.get(self.port, "/_mode?" .. table.concat(q, "&"), nil, { timeout = 5 })
    assert(res, "origin /_mode: " .. tostring(err))
    assert(res.status == 200, "origin /_mode: " .. tostring(res.status) .. " " .. tostring(res.body))
    return cjson.decode(res.body)
end

-- Requests the origin counted for one path (origin.lua: /_stats paths).
function Origin:path_count(path)
    local p = self:stats().paths
    return type(p) == "table" and p[path] or 0
end

-- The origin's echo of a response (the JSON body decoded); raises with the
-- status and body when it is not a 200 echo.
function M.echo(res, err)
    assert(res, "no response: " .. tostring(err))
    if res.status ~= 200 then
        error(string.format("expected a 200 echo, got %s: %s", tostring(res.status), tostring(res.body)), 2)
    end
    local ok, e = pcall(cjson.decode, res.body or "")
    if not ok or type(e) ~= "table" then error("not an echo body: " .. tostring(res.body), 2) end
    return e
end

-- Every value of a request header in an echo, in order (case-insensitive).
function M.echo_headers(e, name)
    local t = {}
    for _, h in ipairs(e.headers) do
        if h[1]:lower() == name:lower() then t[#t + 1] = h[2] end
    end
    return t
end

-- The single value of a request header in an echo (nil if absent; raises if repeated).
function M.echo_header(e, name)
    local t = M.echo_headers(e, name)
    assert(#t <= 1, "header " .. name .. " repeated: " .. table.concat(t, " | "))
    return t[1]
end

--------------------------------------------------------------------------
-- The proxy.

local Proxy = setmetatable({}, { __index = Proc })
Proxy.__index = Proxy

-- Writes a config to a temp file and returns its path. ${name} in text is
-- replaced from vars (an unknown name is an error).
function M.write_config(text, vars, suffix)
    local conf = text:gsub("%${([%w_]+)}", function(k)
        local v = vars and vars[k]
        if v == nil then error("config template: no value for ${" .. k .. "}", 3) end
        return tostring(v)
    end)
    return M.write_file(M.tmpname(suffix or ".lua"), conf)
end

-- A template's text with ${name} replaced from vars (an unknown name is an
-- error), as write_config does, without writing it.
function M.expand_template(text, vars)
    return (text:gsub("%${([%w_]+)}", function(k)
        local v = vars and vars[k]
        if v == nil then error("config template: no value for ${" .. k .. "}", 3) end
        return tostring(v)
    end))
end

-- Starts the binary. opts: config (template text), vars (for the template;
-- listen, port, access_log and admin (a free 127.0.0.1 port, see
-- Proxy:admin) are provided), workers (-w), log_level (-l), nofile (the
-- child's RLIMIT_NOFILE, soft and hard, set by `ulimit -n` in sh before exec),
-- args (more arguments), wait (false: do not wait for the port),
-- conf_path (write the configuration there, e.g. in a folder beside the
-- files it names by relative path, instead of a temp file; not removed).
-- Returns a Proxy: pid, port, url, conf_path, access_log, stop(), stderr()...
function M.start_proxy(opts)
    local port = opts.port or M.free_port()
    local vars = {}
    for k, v in pairs(opts.vars or {}) do vars[k] = v end
    vars.port = port
    vars.listen = "127.0.0.1:" .. port
    vars.access_log = vars.access_log or M.tmpname(".access.log")
    local admin_port
    if vars.admin == nil then
        admin_port = M.free_port()
        vars.admin = "127.0.0.1:" .. admin_port
    end
    local conf
    if opts.conf_path then
        conf = M.write_file(opts.conf_path, M.expand_template(opts.config, vars))
    else
        conf = M.write_config(opts.config, vars)
    end
    local argv = { M.bin(), "-c", conf }
    if opts.workers then
        argv[#argv + 1] = "-w"
        argv[#argv + 1] = tostring(opts.workers)
    end
    if opts.log_level then
        argv[#argv + 1] = "-l"
        argv[#argv + 1] = opts.log_level
    end
    for _, a in ipairs(opts.args or {}) do argv[#argv + 1] = a end
    if opts.nofile then -- sh execs the binary: the PID stays the proxy's
        table.insert(argv, 1, "ulimit -n " .. math.floor(opts.nofile) .. ' && exec "$0" "$@"')
        table.insert(argv, 1, "-c")
        table.insert(argv, 1, "sh")
    end
    local p = setmetatable(M.spawn(argv), Proxy)
    p.port, p.conf_path, p.access_log = port, conf, vars.access_log
    p.admin_port, p.vars, p.admin_token = admin_port, vars, opts.admin_token
    p.url = "http://127.0.0.1:" .. port
    if opts.wait ~= false then wait_listening(p, port, 10, "moonproxy") end
    return p
end

-- Problems in the proxy's error log that fail a spec whatever it tested:
-- sanitizer reports and crashes.
local BAD_LOG = { "AddressSanitizer", "LeakSanitizer", "runtime error:", "Segmentation fault" }

-- For lazy_teardown: stops the proxy (SIGTERM), then every other process
-- given, then removes temp files; raises if the proxy did not exit 0 or its
-- stderr has a sanitizer report.
function M.shutdown(proxy, ...)
    local code, sig
    if proxy then code, sig = proxy:stop() end
    for i = 1, select("#", ...) do
        local p = select(i, ...)
        if p then p:stop() end
    end
    if proxy then
        local log = proxy:stderr()
        for _, bad in ipairs(BAD_LOG) do
            if log:find(bad, 1, true) then error("moonproxy's stderr has '" .. bad .. "':\n" .. log:sub(-4000), 2) end
        end
        if code ~= 0 then
            error(string.format("moonproxy exited with code %s (signal %s) on SIGTERM:\n%s",
                tostring(code), tostring(sig), log:sub(-4000)), 2)
        end
    end
    M.cleanup()
end

-- The access log's lines decoded as JSON (a line that is not JSON raises).
function Proxy:access_log_entries()
    local t = {}
    for line in (M.read_file(self.access_log) or ""):gmatch("[^\n]+") do
        t[#t + 1] = cjson.decode(line)
    end
    return t
end

-- The access log once it stops growing (no new line for 100 ms, at most 2 s):
-- a worker writes a request's line just before its next poll, so a client
-- that has read the response can look before the line is there.
function Proxy:settled_access_log()
    local t, deadline = self:access_log_entries(), socket.gettime() + 2
    repeat
        socket.sleep(0.1)
        local n = #t
        t = self:access_log_entries()
    until #t == n or socket.gettime() > deadline
    return t
end

-- Rewrites the proxy's configuration file in place (for a reload) from a
-- template; vars are added to the ones the proxy was started with.
function Proxy:rewrite_config(text, vars)
    local all = {}
    for k, v in pairs(self.vars or {}) do all[k] = v end
    for k, v in pairs(vars or {}) do all[k] = v end
    local conf = text:gsub("%${([%w_]+)}", function(k)
        local v = all[k]
        if v == nil then error("config template: no value for ${" .. k .. "}", 3) end
        return tostring(v)
    end)
    M.write_file(self.conf_path, conf)
    return conf
end

-- One request to the admin port (the ${admin} address start_proxy chose).
-- Returns the response and its body decoded as JSON (nil when it is not
-- JSON), or nil, err.
function Proxy:admin(method, path, opts)
    assert(self.admin_port, "this proxy was started with its own ${admin} address")
    local headers = { { "Host", "localhost:" .. self.admin_port } } -- the admin port refuses any other name
    if self.admin_token then headers[2] = { "Authorization", "Bearer " .. self.admin_token } end
    local res, err = raw.request(self.admin_port, { method = method, target = path, headers = headers,
        body = (method == "POST" or method == "PUT") and "" or nil }, opts or { timeout = 10 })
    if not res then return nil, err end
    local ok, doc = pcall(cjson.decode, res.body or "")
    return res, ok and type(doc) == "table" and doc or nil
end

-- GET /upstreams on the admin port, decoded (raises when it is not a 200 JSON).
function Proxy:upstreams()
    local res, doc = self:admin("GET", "/upstreams")
    assert(res, "admin /upstreams: " .. tostring(doc))
    assert(res.status == 200, "admin /upstreams status " .. tostring(res.status) .. ": " .. tostring(res.body))
    assert(doc, "admin /upstreams is not JSON: " .. tostring(res.body))
    return doc
end

-- Waits (bounded) until the admin port answers GET /ready with 200.
function Proxy:wait_ready(timeout)
    M.eventually(function()
        local res = self:admin("GET", "/ready")
        return res and res.status == 200
    end, timeout or 5)
end

-- Waits (bounded) until no server of any upstream has a request in flight;
-- raises naming the first one that still has.
function Proxy:wait_all_idle(timeout)
    M.eventually(function()
        for name, u in pairs(self:upstreams()) do
            for _, sv in ipairs(u.servers) do
                if sv.active ~= 0 then error(name .. " " .. sv.addr .. " active " .. sv.active) end
            end
        end
        return true
    end, timeout or 3)
end

-- One server's entry of /upstreams (upstream name, "host:port"), or nil.
function Proxy:server_state(upstream, addr)
    local u = self:upstreams()[upstream]
    assert(u, "no upstream " .. upstream .. " in /upstreams")
    for _, s in ipairs(u.servers or {}) do
        if s.addr == addr then return s end
    end
end

-- How many lines of the proxy's stderr contain every plain string given.
function Proxy:log_count(...)
    return #M.lines_with(self:stderr(), ...)
end

-- The text of an example configuration made runnable in a spec: each
-- { from, to } pair replaces a literal that must stand exactly once in the
-- example (an address by a ${var} for start_proxy, the access log by
-- ${access_log}, a timeout by a shorter one); raises when one does not.
function M.example_text(path, swaps)
    local text = assert(M.read_file(path))
    for i, sw in ipairs(swaps) do
        local n
        text, n = text:gsub(sw[1]:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0"), (sw[2]:gsub("%%", "%%%%")))
        if n ~= 1 then
            error(string.format("%s: '%s' stands %d times, not once (substitution %d)", path, sw[1], n, i), 2)
        end
    end
    return text
end

-- Checks an example with `moonproxy -t` (it must print ok) and returns its
-- summary from moonproxy.core.load_config.
function M.check_example(path)
    local out, rc = M.run(M.quote(M.bin()) .. " -t -c " .. path)
    if rc ~= 0 or out ~= "ok\n" then
        error(string.format("moonproxy -t -c %s: exit %s:\n%s", path, tostring(rc), out), 2)
    end
    local cfg, err = require("moonproxy.core").load_config(path)
    return assert(cfg, err)
end

-- The number (1-based) of the first line of text that contains needle.
function M.line_of(text, needle)
    local n = 0
    for line in (text .. "\n"):gmatch("(.-)\n") do
        n = n + 1
        if line:find(needle, 1, true) then return n end
    end
    error("no line contains " .. needle, 2)
end

-- The lines of text (stderr...) that contain every one of the plain strings given.
function M.lines_with(text, ...)
    local out = {}
    for line in text:gmatch("[^\n]+") do
        local all = true
        for i = 1, select("#", ...) do
            if not line:find((select(i, ...)), 1, true) then
                all = false
                break
            end
        end
        if all then out[#out + 1] = line end
    end
    return out
end

-- Concurrent clients: opens one connection per entry of conns (a list of
-- lists of requests for raw.build) before sending anything, then sends each
-- connection's requests at once (pipelined), then reads every response.
-- Returns a list (per connection) of lists of responses; raises on a
-- connect, send or read error (every read bounded by opts.timeout, 10 s).
function M.fan_out(port, conns, opts)
    opts = opts or {}
    local timeout = opts.timeout or 10
    local cs = {}
    local ok, err = pcall(function()
        for i = 1, #conns do
            cs[i] = assert(raw.connect(port, { timeout = timeout }))
        end
        for i, reqs in ipairs(conns) do
            local bytes = {}
            for j, r in ipairs(reqs) do bytes[j] = type(r) == "table" and raw.build(r) or r end
            assert(cs[i]:send(table.concat(bytes)))
        end
    end)
    local out = {}
    if ok then
        ok, err = pcall(function()
            for i, reqs in ipairs(conns) do
                out[i] = {}
                for j in ipairs(reqs) do
                    local res, rerr = cs[i]:read_response { timeout = timeout }
                    if not res then error(string.format("connection %d, response %d: %s", i, j, tostring(rerr))) end
                    out[i][j] = res
                end
            end
        end)
    end
    for _, c in pairs(cs) do c:close() end
    if not ok then error("fan_out: " .. tostring(err), 2) end
    return out
end

--------------------------------------------------------------------------
-- Load: many requests over a few concurrent keep-alive connections.

-- Parses one complete response at the start of buf: returns res, rest; or
-- nil while incomplete (at_eof: the connection ended, a close-delimited
-- body is then complete).
local function parse_response(buf, at_eof, head_only)
    local he = buf:find("\r\n\r\n", 1, true)
    if not he then return nil end
    local head = buf:sub(1, he - 1)
    local status = tonumber(head:match("^HTTP/%d%.%d (%d%d%d)"))
    if not status then error("load: bad response head: " .. head:sub(1, 200)) end
    local res = setmetatable({ status = status, headers = {} }, { __index = {
        header = function(self, name)
            name = name:lower()
            for _, hv in ipairs(self.headers) do if hv[1]:lower() == name then return hv[2] end end
        end } })
    for line in head:gmatch("\r\n([^\r\n]*)") do
        local n, v = line:match("^([^:]+):[ \t]*(.-)[ \t]*$")
        if n then res.headers[#res.headers + 1] = { n, v } end
    end
    local rest = buf:sub(he + 4)
    local cl, te = res:header("content-length"), res:header("transfer-encoding")
    if head_only or (status >= 100 and status < 200) or status == 204 or status == 304 then
        res.body = ""
        return res, rest
    elseif te and te:lower():find("chunked") then
        local parts, at = {}, 1
        while true do
            local le = rest:find("\r\n", at, true)
            if not le then return nil end
            local size = tonumber(rest:sub(at, le - 1):match("^(%x+)"), 16)
            if not size then error("load: bad chunk size line") end
            if size == 0 then
                local te2 = rest:find("\r\n\r\n", le, true)
                if not te2 then return nil end
                res.body = table.concat(parts)
                return res, rest:sub(te2 + 4)
            end
            if #rest < le + 1 + size + 2 then return nil end
            parts[#parts + 1] = rest:sub(le + 2, le + 1 + size)
            at = le + 2 + size + 2
        end
    elseif cl then
        local n = tonumber(cl)
        if #rest < n then return nil end
        res.body = rest:sub(1, n)
        return res, rest:sub(n + 1)
    elseif at_eof then
        res.body = rest
        return res, ""
    end
    return nil
end

-- Sends opts.total requests to port over opts.concurrency (default 1)
-- keep-alive connections, each sending its next request as soon as its last
-- response is complete (so that many are in flight at every moment).
-- opts.request(i) returns the i-th request (a table for raw.build, or bytes;
-- default GET /); opts.timeout bounds the whole run (default 60 s). A
-- connection that closes is replaced. Returns the list (by i) of responses
-- {status, headers, body, header(name)}, or {err = ...} for a request whose
-- connection broke before a complete response, and a table of the counts of
-- X-Origin values (the status as "status NNN" when there is none).
function M.load(port, opts)
    local total, conc = opts.total, math.min(opts.concurrency or 1, opts.total)
    local build = opts.request or function() return { target = "/" } end
    local deadline = socket.gettime() + (opts.timeout or 60)
    local results, counts = {}, {}
    local next_i, done = 1, 0
    local conns = {}

    local function open()
        local sock = socket.tcp()
        sock:settimeout(5)
        local ok, err = sock:connect("127.0.0.1", port)
        if not ok then
            sock:close()
            error("load: connect: " .. tostring(err))
        end
        sock:setoption("tcp-nodelay", true)
        return { sock = sock, buf = "" }
    end

    local function finish(i, res)
        results[i] = res
        done = done + 1
        local key = res.err and ("error " .. res.err) or res:header("x-origin") or ("status " .. res.status)
        counts[key] = (counts[key] or 0) + 1
    end

    local function send_next(c)
        if next_i > total then
            c.i = nil
            return
        end
        local i = next_i
        next_i = next_i + 1
        local r = build(i)
        c.i, c.head_only = i, type(r) == "table" and r.method == "HEAD"
        local bytes = type(r) == "table" and raw.build(r) or r
        c.sock:settimeout(5)
        local pos = 1
        while pos <= #bytes do
            local last, err, lastpart = c.sock:send(bytes, pos)
            if not last then
                if err == "closed" then break end -- read side reports it
                error("load: send: " .. tostring(err))
            end
            pos = last + 1
            if lastpart then pos = lastpart + 1 end
        end
        c.sock:settimeout(0)
    end

    for k = 1, conc do
        conns[k] = open()
        send_next(conns[k])
    end

    while done < total do
        if socket.gettime() > deadline then
            for _, c in ipairs(conns) do c.sock:close() end
            error(string.format("load: %d of %d responses within the time limit", done, total))
        end
        local socks, by = {}, {}
        for _, c in ipairs(conns) do
            if c.i then
                socks[#socks + 1] = c.sock
                by[c.sock] = c
            end
        end
        local ready = socket.select(socks, nil, 0.5)
        for _, s in ipairs(ready) do
            local c = by[s]
            local data, err, partial = s:receive(65536)
            local got = data or partial
            if got and #got > 0 then c.buf = c.buf .. got end
            local eof = err and err ~= "timeout"
            while c.i do
                local res, rest = parse_response(c.buf, eof, c.head_only)
                if not res then break end
                c.buf = rest
                if res.status >= 100 and res.status < 200 then goto continue end -- interim: skip
                finish(c.i, res)
                local close = false
                local conn = res:header("connection")
                if conn and conn:lower():find("close") then close = true end
                if close or eof then
                    c.sock:close()
                    local nc = open()
                    c.sock, c.buf, eof = nc.sock, "", false
                end
                send_next(c)
                ::continue::
            end
            if eof and c.i then
                finish(c.i, { err = err })
                c.sock:close()
                local nc = open()
                c.sock, c.buf = nc.sock, ""
                send_next(c)
            end
        end
    end
    for _, c in ipairs(conns) do c.sock:close() end
    return results, counts
end

-- "a=N b=M" for a counts table (messages).
function M.show_counts(counts)
    local keys = {}
    for k in pairs(counts) do keys[#keys + 1] = k end
    table.sort(keys)
    for i, k in ipairs(keys) do keys[i] = k .. "=" .. counts[k] end
    return table.concat(keys, " ")
end

return M
