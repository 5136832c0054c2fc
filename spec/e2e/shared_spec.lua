-- End-to-end: proxy.shared through hooks with two workers: incr loses no
-- update across workers, set/get/add/delete are seen by every worker, a ttl
-- expires (not before its time), and a dictionary keeps its data across a
-- reload (POST /reload on the admin port).
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local socket = require "socket"

-- x-vm: which VM answered (a number drawn from the dict at load time);
-- x-marker: the configuration generation's marker.
local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false }
local d = proxy.shared("counts", "1m")
local vm = tostring(d:incr("vm", 1, 0))

proxy.on_response(function(req, res)
  res.headers["x-vm"] = vm
  res.headers["x-marker"] = "${marker}"
end)

local function show(...)
  local t = {}
  for i = 1, select("#", ...) do t[i] = tostring((select(i, ...))) end
  return table.concat(t, " ")
end

-- /incr?KEY: one d:incr(KEY, 1, 0), answers the new value
proxy.route { path = "/incr", handler = function(req)
  return req:respond(200, tostring(d:incr(req.query, 1, 0)))
end }
-- /bulk?KEY: 1000 increments of KEY in one request
proxy.route { path = "/bulk", handler = function(req)
  local n
  for _ = 1, 1000 do n = d:incr(req.query, 1, 0) end
  return req:respond(200, tostring(n))
end }
-- /set?KEY=VALUE[&ttl=SECONDS], /add?KEY=VALUE
proxy.route { path = "/set", handler = function(req)
  local k, v = req.query:match("^([^=&]+)=([^&]*)")
  return req:respond(200, show(d:set(k, v, tonumber(req.query:match("ttl=([%d.]+)")))))
end }
proxy.route { path = "/add", handler = function(req)
  local k, v = req.query:match("^([^=&]+)=([^&]*)")
  return req:respond(200, show(d:add(k, v, tonumber(req.query:match("ttl=([%d.]+)")))))
end }
-- /get?KEY: the value, or "(nil)"
proxy.route { path = "/get", handler = function(req)
  local v = d:get(req.query)
  return req:respond(200, v == nil and "(nil)" or tostring(v))
end }
proxy.route { path = "/delete", handler = function(req)
  return req:respond(200, show(d:delete(req.query)))
end }
]=]

describe("proxy.shared across two workers", function()
    local proxy

    lazy_setup(function()
        proxy = h.start_proxy { workers = 2, config = CONFIG, vars = { marker = "v1" } }
        h.eventually(function() return h.port_open(proxy.admin_port) end, 5)
    end)

    lazy_teardown(function()
        h.shutdown(proxy)
    end)

    local function body(target)
        local res = assert(raw.get(proxy.port, target))
        assert.equal(200, res.status, res.body)
        return res.body, res
    end

    -- n connections, each with per requests for target pipelined; returns the
    -- responses and how many distinct VMs answered.
    local function spread(n, per, target)
        local conns = {}
        for i = 1, n do
            conns[i] = {}
            for j = 1, per do conns[i][j] = { target = target } end
        end
        local all, vms, nvm = {}, {}, 0
        for _, list in ipairs(h.fan_out(proxy.port, conns)) do
            for _, res in ipairs(list) do
                assert.equal(200, res.status, res.body)
                all[#all + 1] = res
                local vm = res:header("x-vm")
                if vm and not vms[vm] then
                    vms[vm] = true
                    nvm = nvm + 1
                end
            end
        end
        return all, nvm
    end

    it("incr gives every request of many connections a distinct value: exactly 1..N", function()
        local all, nvm = spread(16, 25, "/incr?seq")
        assert(nvm >= 2, "every connection went to one worker; cannot show sharing")
        local values, seen = {}, {}
        for _, res in ipairs(all) do
            local n = tonumber(res.body)
            assert(n and n == math.floor(n), "not an integer: " .. tostring(res.body))
            assert(not seen[n], "value " .. n .. " given twice")
            seen[n] = true
            values[#values + 1] = n
        end
        table.sort(values)
        for i = 1, #values do
            assert.equal(i, values[i])
        end
        assert.equal(400, #values)
        assert.equal("400", (body("/get?seq")))
    end)

    it("loses no increment when both workers hammer one key", function()
        local all, nvm = spread(16, 5, "/bulk?hammer")
        assert(nvm >= 2, "every connection went to one worker; cannot show sharing")
        local max = 0
        for _, res in ipairs(all) do max = math.max(max, tonumber(res.body)) end
        assert.equal(80000, max)
        assert.equal("80000", (body("/get?hammer")))
    end)

    it("lets every worker read what one worker set, add and delete", function()
        assert.equal("true", (body("/set?color=blue")))
        local all, nvm = spread(16, 2, "/get?color")
        assert(nvm >= 2, "every connection went to one worker")
        for _, res in ipairs(all) do assert.equal("blue", res.body) end
        assert.equal("nil exists", (body("/add?color=red")))
        assert.equal("blue", (body("/get?color")))
        assert.equal("true", (body("/add?shape=round")))
        assert.equal("round", (body("/get?shape")))
        body("/delete?color")
        for _, res in ipairs((spread(16, 1, "/get?color"))) do assert.equal("(nil)", res.body) end
        assert.equal("true", (body("/add?color=red")))
        assert.equal("red", (body("/get?color")))
    end)

    it("forgets a value once its ttl has passed, not before", function()
        local t0 = socket.gettime()
        assert.equal("true", (body("/set?brief=here&ttl=0.6")))
        assert.equal("true", (body("/set?lasting=here")))
        local first = body("/get?brief")
        if socket.gettime() - t0 < 0.5 then assert.equal("here", first) end
        h.eventually(function() return body("/get?brief") == "(nil)" end, 5, 0.05)
        assert(socket.gettime() - t0 >= 0.55, "expired after " .. (socket.gettime() - t0) .. " s, ttl 0.6")
        for _, res in ipairs((spread(16, 1, "/get?brief"))) do assert.equal("(nil)", res.body) end
        assert.equal("here", (body("/get?lasting")))
        -- an expired key is free for add again
        assert.equal("true", (body("/add?brief=again")))
        assert.equal("again", (body("/get?brief")))
    end)

    it("keeps the dictionary and its data across a reload", function()
        for i = 1, 5 do assert.equal(tostring(i), (body("/incr?reload"))) end
        assert.equal("true", (body("/set?kept=yes")))
        local vm_before = tonumber((body("/get?vm")))
        proxy:rewrite_config(CONFIG, { marker = "v2" })
        local res, doc = proxy:admin("POST", "/reload")
        assert(res, "POST /reload: " .. tostring(doc))
        assert.equal(200, res.status, res.body)
        h.eventually(function()
            local r = raw.get(proxy.port, "/get?reload")
            return r and r.status == 200 and r:header("x-marker") == "v2"
        end, 5)
        local all, nvm = spread(16, 1, "/get?kept")
        for _, r in ipairs(all) do
            assert.equal("v2", r:header("x-marker"))
            assert.equal("yes", r.body)
        end
        assert(nvm >= 2, "every connection went to one worker")
        assert.equal("6", (body("/incr?reload")))
        -- the new generation's VMs drew their ids from the same counter
        for _, r in ipairs(all) do
            assert(tonumber(r:header("x-vm")) > vm_before, "x-vm " .. tostring(r:header("x-vm")) .. " <= " .. vm_before)
        end
    end)

    it("refuses a reload that declares the dictionary with another size, and keeps serving its data", function()
        local text = proxy:rewrite_config((CONFIG:gsub('"counts", "1m"', '"counts", "2m"')), { marker = "v3" })
        local res, doc = proxy:admin("POST", "/reload")
        assert(res, "POST /reload: " .. tostring(doc))
        assert.equal(422, res.status, res.body)
        local at = proxy.conf_path:match("[^/]+$") .. ":" .. h.line_of(text, 'proxy.shared("counts"') .. ":"
        assert(doc and type(doc.error) == "string" and doc.error:find(at, 1, true), "expected " .. at .. " in " .. res.body)
        local r = assert(raw.get(proxy.port, "/get?kept"))
        assert.equal("yes", r.body)
        assert.equal("v2", r:header("x-marker"))
    end)
end)
