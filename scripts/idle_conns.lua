-- idle_conns.lua HOST PORT N [STOP_FILE] [HOLD_SECONDS]
--
-- Opens N keep-alive client connections to an HTTP proxy, sends one complete
-- GET on each and reads the whole response (so the proxy has done real work on
-- every connection and holds its steady-state per-connection state, not just
-- an accepted socket), then leaves them all idle. Used by scripts/bench.sh to
-- measure a proxy's memory per idle client connection.
--
-- Prints "opened K" (K <= N: it stops early on the first failure rather than
-- hang) once all are open, then holds them until STOP_FILE exists or
-- HOLD_SECONDS (default 120) have passed, closes them and exits. Every network
-- step has a timeout and the opening phase has an overall deadline, so the
-- script always ends by itself.
--
-- Needs luajit + luasocket. Blocking sockets only: socket.select() is limited
-- to FD_SETSIZE (1024) descriptors, far fewer than we hold.
-- IDLE_CONNS_TLS=1 in the environment: TLS connections (LuaSec, no
-- certificate verification), for scripts/bench/tls.sh.

local socket = require "socket"
local ffi = require "ffi"

local host, port, n = arg[1], tonumber(arg[2]), tonumber(arg[3])
local stop_file = arg[4]
local hold = tonumber(arg[5] or "120")
if not (host and port and n) then
  io.stderr:write("usage: luajit idle_conns.lua HOST PORT N [STOP_FILE] [HOLD_SECONDS]\n")
  os.exit(2)
end

local OPEN_DEADLINE = 90   -- seconds for the whole opening phase
local IO_TIMEOUT = 5       -- seconds per connect/send/receive

-- Each connection is one descriptor: raise the soft RLIMIT_NOFILE towards the
-- hard limit (luasocket has no binding for it, so use the FFI).
ffi.cdef [[
  struct mp_rlimit { unsigned long cur, max; };
  int getrlimit(int resource, struct mp_rlimit *rl);
  int setrlimit(int resource, const struct mp_rlimit *rl);
]]
do
  local RLIMIT_NOFILE = 7  -- Linux
  local rl = ffi.new("struct mp_rlimit")
  if ffi.C.getrlimit(RLIMIT_NOFILE, rl) == 0 then
    local want = n + 64
    if rl.cur < want then
      rl.cur = (rl.max < want) and rl.max or want
      ffi.C.setrlimit(RLIMIT_NOFILE, rl)
    end
    if rl.cur < n + 16 then
      io.stderr:write(("idle_conns: RLIMIT_NOFILE is %d, fewer than %d connections will open\n")
        :format(tonumber(rl.cur), n))
    end
  end
end

local request = ("GET / HTTP/1.1\r\nHost: %s:%d\r\nConnection: keep-alive\r\n" ..
                 "User-Agent: moonproxy-idle-conns\r\n\r\n"):format(host, port)

-- Read one response (status line, headers, body by Content-Length or chunked)
-- and check that the server means to keep the connection open.
local function read_response(s)
  local status, err = s:receive("*l")
  if not status then return nil, "status line: " .. err end
  if not status:match("^HTTP/1%.%d 2%d%d") then return nil, "status: " .. status end
  local len, chunked, close = 0, false, status:match("^HTTP/1%.0") ~= nil
  while true do
    local line, e = s:receive("*l")
    if not line then return nil, "header: " .. e end
    if line == "" then break end
    local k, v = line:match("^([^:]+):%s*(.-)%s*$")
    if k then
      k, v = k:lower(), v:lower()
      if k == "content-length" then len = tonumber(v) or 0
      elseif k == "transfer-encoding" and v:find("chunked", 1, true) then chunked = true
      elseif k == "connection" then
        if v:find("close", 1, true) then close = true
        elseif v:find("keep-alive", 1, true) then close = false end
      end
    end
  end
  if chunked then
    while true do
      local sz, e = s:receive("*l")
      if not sz then return nil, "chunk size: " .. e end
      local size = tonumber(sz:match("^%x+"), 16)
      if not size then return nil, "bad chunk size: " .. sz end
      if size == 0 then
        repeat local t = s:receive("*l") until t == nil or t == ""
        break
      end
      local _, e2 = s:receive(size + 2)
      if e2 then return nil, "chunk: " .. e2 end
    end
  elseif len > 0 then
    local _, e = s:receive(len)
    if e then return nil, "body: " .. e end
  end
  if close then return nil, "server closes the connection" end
  return true
end

local conns = {}
local started = socket.gettime()
for i = 1, n do
  if socket.gettime() - started > OPEN_DEADLINE then
    io.stderr:write(("idle_conns: deadline after %d connections\n"):format(i - 1))
    break
  end
  local s, err = socket.tcp()
  local ok
  if s then
    s:settimeout(IO_TIMEOUT)
    ok, err = s:connect(host, port)
    if ok and os.getenv("IDLE_CONNS_TLS") == "1" then
      s, err = require("ssl").wrap(s, { mode = "client", protocol = "any", verify = "none", options = "all" })
      ok = s ~= nil
      if ok then
        s:settimeout(IO_TIMEOUT)
        ok, err = s:dohandshake()
      end
    end
    if ok then ok, err = s:send(request) end
    if ok then ok, err = read_response(s) end
  end
  if not ok then
    io.stderr:write(("idle_conns: connection %d: %s\n"):format(i, tostring(err)))
    if s then s:close() end
    break
  end
  conns[#conns + 1] = s
end

io.stdout:write(("opened %d\n"):format(#conns))
io.stdout:flush()

-- Hold, polling for the stop file (bash can't signal us more cheaply than this).
local hold_until = socket.gettime() + hold
while socket.gettime() < hold_until do
  if stop_file then
    local f = io.open(stop_file, "r")
    if f then f:close(); break end
  end
  socket.sleep(0.1)
end

for _, s in ipairs(conns) do s:close() end
os.exit(#conns > 0 and 0 or 1)
