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
