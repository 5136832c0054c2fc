-- End-to-end: the hook watchdog (settings.hook_timeout). A runaway hook in
-- interpreted code is stopped with a 500 for its request only; one LuaJIT
-- compiled (which checks no hooks) is reported: /live answers 503 and the
-- stuck worker stops accepting, so the other worker serves new connections.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false, hook_timeout = 0.3, shutdown_timeout = 1 }
local a = proxy.upstream "a" { servers = { "${a}" } }
-- jit.off keeps this loop in the interpreter, where hooks are checked
proxy.route { path = "/interpreted", handler = function(req)
  jit.off(true, true)
  local n = 0
  while true do n = n + 1 end
end }
proxy.route { path = "/compiled", handler = function(req)
  local n = 0
  while true do n = n + 1 end
end }
proxy.route { prefix = "/", upstream = a }
]=]

describe("the hook watchdog", function()
    local a, proxy

    lazy_setup(function()
        a = h.start_origin("a")
        proxy = h.start_proxy { workers = 2, config = CONFIG, vars = { a = a.addr } }
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a)
    end)

    it("stops an interpreted runaway hook with a 500 for that request", function()
        local res = assert(raw.get(proxy.port, "/interpreted", nil, { timeout = 10 }))
        assert.equal(500, res.status)
        assert.matches("hook_timeout", proxy:stderr(), 1, true)
    end)

    it("keeps serving on the same workers afterwards", function()
        for _ = 1, 6 do
            local res = assert(raw.get(proxy.port, "/after"))
            assert.equal(200, res.status)
        end
        local live = assert(proxy:admin("GET", "/live"))
        assert.equal(200, live.status)
    end)

    it("reports a compiled runaway hook on /live and lets the other worker take new connections", function()
        local c = assert(raw.connect(proxy.port, { timeout = 0.5 }))
        c:send("GET /compiled HTTP/1.1\r\nHost: x\r\n\r\n")
        h.eventually(function()
            local live = proxy:admin("GET", "/live")
            return live and live.status == 503
        end, 5)
        assert.matches("cannot be interrupted", proxy:stderr(), 1, true)
        c:close()
        for _ = 1, 10 do
            local res = assert(raw.get(proxy.port, "/still-served", nil, { timeout = 5 }))
            assert.equal(200, res.status)
        end
    end)
end)

-- A hook that blocks in C (here poll(2) through the FFI) runs no count hook:
-- the watchdog gives up on it after 3 × hook_timeout and takes the worker's
-- listeners out; once the call returns, the worker listens again.
local BLOCKING = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false, hook_timeout = 0.2, shutdown_timeout = 1 }
local a = proxy.upstream "a" { servers = { "${a}" } }
local ffi = require "ffi"
pcall(ffi.cdef, "int poll(void *fds, unsigned long nfds, int timeout);")
proxy.route { path = "/block", handler = function(req)
  ffi.C.poll(nil, 0, 1500)
  return req:respond(200, "late")
end }
-- LuaJIT 2.1 compiles a loop around a C library function (it stitches the
-- call into the trace): no count hook runs in it; this one ends by itself
proxy.route { path = "/gc-loop", handler = function(req)
  local stop = os.clock() + 1.2
  while os.clock() < stop do collectgarbage("step") end
  return req:respond(200, "done")
end }
-- stopped by the count hook although every error is caught in the loop
proxy.route { path = "/pcall", handler = function(req)
  jit.off(true, true)
  while true do pcall(function() local t = {} for i = 1, 100 do t[i] = i end end) end
end }
-- stopped in a coroutine the hook runs
proxy.route { path = "/coroutine", handler = function(req)
  jit.off(true, true)
  local co = coroutine.wrap(function() local n = 0 while true do n = n + 1 end end)
  co()
end }
proxy.route { prefix = "/", upstream = a }
]=]

describe("the hook watchdog and a hook blocked in C (-w 1)", function()
    local a, proxy

    lazy_setup(function()
        a = h.start_origin("a")
        proxy = h.start_proxy { workers = 1, config = BLOCKING, vars = { a = a.addr } }
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a)
    end)

    local function live_status()
        local live = proxy:admin("GET", "/live")
        return live and live.status
    end

    -- One stuck request: /live goes 503, then 200 again once the call
    -- returned, the worker uses no CPU meanwhile, writes a bounded number
    -- of lines, and accepts again.
    local function stuck_once(round, path)
        local before = #h.lines_with(proxy:stderr(), "")
        local c = assert(raw.connect(proxy.port, { timeout = 5 }))
        finally(function() c:close() end)
        assert(c:send("GET " .. (path or "/block") .. " HTTP/1.1\r\nHost: x\r\n\r\n"))
        h.eventually(function() return live_status() == 503 end, 3)
        h.eventually(function() return live_status() == 200 end, 5)
        local res = assert(c:read_response { timeout = 5 })
        -- 200, or 500 when the count hook met Lua code after the call
        assert.is_true(res.status == 200 or res.status == 500, tostring(res.status))
        local share = h.cpu_share(proxy.pid, 1.0)
        assert.is_true(share < 0.2, string.format("round %d: %.0f%% of a core after the hook returned", round,
            share * 100))
        for i = 1, 5 do
            local r = assert(raw.get(proxy.port, "/after-" .. round .. "-" .. i, nil, { timeout = 3 }))
            assert.equal(200, r.status)
        end
        local lines = #h.lines_with(proxy:stderr(), "") - before
        assert.is_true(lines < 20, round .. ": " .. lines .. " log lines:\n" .. proxy:stderr():sub(-2000))
        assert.equal(round, #h.lines_with(proxy:stderr(), "accepting new connections again"))
    end

    it("gives the worker back once a hook blocked in C returns", function()
        stuck_once(1)
    end)

    it("gives it back again after a second stuck request", function()
        stuck_once(2)
    end)

    it("reports a compiled loop around collectgarbage('step') and gives the worker back when it ends", function()
        stuck_once(3, "/gc-loop")
    end)

    it("stops an interpreted loop that catches the error with pcall", function()
        local res = assert(raw.get(proxy.port, "/pcall", nil, { timeout = 5 }))
        assert.equal(500, res.status)
        assert.equal(200, live_status())
    end)

    it("stops an interpreted loop in a coroutine the hook started", function()
        local res = assert(raw.get(proxy.port, "/coroutine", nil, { timeout = 5 }))
        assert.equal(500, res.status)
        assert.equal(200, live_status())
    end)
end)

-- Linux gives an auto-bound port (listen on port 0) back on shutdown(2), the
-- watchdog's way to take a stuck worker out: listening again picked a new
-- port, and the one the log printed refused connections.
describe("the hook watchdog and a listener on port 0 (-w 1)", function()
    local a, proxy

    lazy_setup(function()
        a = h.start_origin("a")
        proxy = h.start_proxy { workers = 1, wait = false, vars = { a = a.addr },
            config = BLOCKING:gsub("%${listen}", "127.0.0.1:0") }
        proxy:wait_ready()
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a)
    end)

    it("keeps the port the log printed once the stuck hook returns", function()
        local port
        h.eventually(function()
            port = tonumber(proxy:stderr():match("listening on 127%.0%.0%.1:(%d+)"))
            return port ~= nil
        end, 5)
        assert.equal(200, assert(raw.get(port, "/before")).status)
        local c = assert(raw.connect(port, { timeout = 5 }))
        finally(function() c:close() end)
        assert(c:send("GET /block HTTP/1.1\r\nHost: x\r\n\r\n"))
        h.eventually(function() local r = proxy:admin("GET", "/live") return r and r.status == 503 end, 3)
        h.eventually(function() local r = proxy:admin("GET", "/live") return r and r.status == 200 end, 5)
        assert(c:read_response { timeout = 5 })
        for i = 1, 3 do
            local res, err = raw.get(port, "/after-" .. i, nil, { timeout = 3 })
            assert.equal(200, res and res.status, tostring(err))
        end
    end)
end)
