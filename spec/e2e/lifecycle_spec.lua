-- End-to-end: the command line (-t, --version, --help, config errors) and the
-- graceful stop on SIGTERM.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local socket = require "socket"

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.settings { access_log = "${access_log}", shutdown_timeout = 20 }
local a = proxy.upstream "a" { servers = { "${a}" }, keepalive = 8 }
proxy.route { prefix = "/", upstream = a }
]=]

-- Line 4 names an upstream nobody declared.
local UNKNOWN_UPSTREAM = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
local a = proxy.upstream "a" { servers = { "127.0.0.1:9" } }
proxy.route { prefix = "/", upstream = "nope" }
]=]

-- Line 3 is not Lua.
local SYNTAX_ERROR = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.route { prefix = "/" upstream = a }
]=]

local function basename(path)
    return path:match("[^/]+$")
end

local function run(args, timeout)
    return h.run(h.quote(h.bin()) .. " " .. args, timeout)
end

local function config(text, vars)
    local v = { listen = "127.0.0.1:" .. h.free_port(), access_log = h.tmpname(".log"), a = "127.0.0.1:9" }
    for k, x in pairs(vars or {}) do v[k] = x end
    return h.write_config(text, v)
end

describe("moonproxy command line", function()
    lazy_teardown(function() h.cleanup() end)

    it("-t prints ok and exits 0 for a good configuration", function()
        local out, rc = run("-t -c " .. h.quote(config(CONFIG)))
        assert.equal(0, rc, out)
        assert.equal("ok", out:match("^%s*(.-)%s*$"))
    end)

    it("-t binds nothing", function()
        local busy = assert(socket.bind("127.0.0.1", 0))
        finally(function() busy:close() end)
        local _, port = busy:getsockname()
        local out, rc = run("-t -c " .. h.quote(config(CONFIG, { listen = "127.0.0.1:" .. port })))
        assert.equal(0, rc, out)
        assert.equal("ok", out:match("^%s*(.-)%s*$"))
    end)

    it("-t prints file:line and exits 1 for a route naming an unknown upstream", function()
        local path = config(UNKNOWN_UPSTREAM)
        local out, rc = run("-t -c " .. h.quote(path))
        assert.equal(1, rc, out)
        assert.truthy(out:find(basename(path) .. ":4:", 1, true), out)
    end)

    it("-t prints file:line and exits 1 for a syntax error", function()
        local path = config(SYNTAX_ERROR)
        local out, rc = run("-t -c " .. h.quote(path))
        assert.equal(1, rc, out)
        assert.truthy(out:find(basename(path) .. ":3:", 1, true), out)
    end)

    it("exits non-zero with file:line when the configuration is broken at start", function()
        local path = config(UNKNOWN_UPSTREAM)
        local out, rc = run("-w 1 -c " .. h.quote(path), 10)
        assert.is_not.equal(0, rc, out)
        assert.is_not.equal(124, rc, "still running after 10 s: " .. out)
        assert.truthy(out:find(basename(path) .. ":4:", 1, true), out)
    end)

    it("--version prints the name and version and exits 0", function()
        local out, rc = run("--version")
        assert.equal(0, rc, out)
        assert.truthy(out:match("moonproxy") and out:match("%d+%.%d+"), out)
    end)

    it("--help prints the usage and exits 0", function()
        local out, rc = run("--help")
        assert.equal(0, rc, out)
        assert.truthy(out:find("-c", 1, true) and out:find("-t", 1, true), out)
    end)
end)

describe("moonproxy on SIGTERM", function()
    local a

    lazy_setup(function()
        a = h.start_origin("a")
    end)

    lazy_teardown(function()
        if a then a:stop() end
        h.cleanup()
    end)

    -- A proxy with a /slow request of ms in flight (arrived at the origin).
    local function proxy_with_slow_request(ms)
        local p = h.start_proxy { workers = 1, config = CONFIG, vars = { a = a.addr } }
        local before = a:stats()
        local c = assert(raw.connect(p.port, { timeout = 10 }))
        assert(c:send("GET /slow?ms=" .. ms .. " HTTP/1.1\r\nHost: x\r\n\r\n"))
        h.eventually(function() return a:stats().requests == before.requests + 1 end, 3)
        return p, c
    end

    it("lets an in-flight request finish and exits 0", function()
        local p, c = proxy_with_slow_request(1500)
        finally(function() c:close(); p:stop() end)
        p:kill("TERM")
        local res = assert(c:read_response { timeout = 5 })
        assert.equal(200, res.status)
        c:close()
        assert.equal(0, (p:wait(10)))
    end)

    it("refuses new connections once stopping", function()
        local p, c = proxy_with_slow_request(1500)
        finally(function() c:close(); p:stop() end)
        p:kill("TERM")
        h.eventually(function() return not h.port_open(p.port) end, 1)
        assert.is_true(p:alive(), "exited before the in-flight request finished")
        assert.equal(200, assert(c:read_response { timeout = 5 }).status)
    end)

    it("closes idle keep-alive client connections and exits promptly", function()
        local p = h.start_proxy { workers = 1, config = CONFIG, vars = { a = a.addr } }
        local c = assert(raw.connect(p.port))
        finally(function() c:close(); p:stop() end)
        assert.equal(200, assert(c:request { target = "/before-stop" }).status)
        p:kill("TERM")
        assert.is_true(c:wait_closed(5))
        assert.equal(0, (p:wait(5)))
    end)

    it("exits at once with status 1 on a second SIGTERM", function()
        local p, c = proxy_with_slow_request(5000)
        finally(function() c:close(); p:stop() end)
        p:kill("TERM")
        h.eventually(function() return not h.port_open(p.port) end, 1)
        p:kill("TERM")
        assert.equal(1, (p:wait(1.5)))
    end)
end)
