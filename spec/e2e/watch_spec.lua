-- End-to-end: settings.watch reloads when the script, or a module it
-- requires from its own folder, changes on disk.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"

local CONFIG = [=[
local proxy = require "moonproxy"
local answer = require "${module}"
proxy.listen { addr = "${listen}" }
proxy.settings { access_log = false, watch = true }
proxy.route { path = "/x", handler = function(req) return req:respond(200, answer .. "${marker}") end }
]=]

describe("settings.watch", function()
    local proxy, dir, module

    lazy_setup(function()
        -- the module sits beside the script (temp files share one folder)
        dir = h.tmpname(".lua"):match("^(.*)/[^/]*$")
        module = "mp_watch_" .. tostring(os.time()) .. "_" .. tostring(math.random(1e6))
        h.write_file(dir .. "/" .. module .. ".lua", 'return "one"')
        proxy = h.start_proxy { workers = 1, config = CONFIG, vars = { module = module, marker = "-a" } }
    end)

    lazy_teardown(function()
        h.shutdown(proxy)
        if module then os.remove(dir .. "/" .. module .. ".lua") end
    end)

    local function body()
        local res = raw.get(proxy.port, "/x")
        return res and res.status == 200 and res.body
    end

    it("reloads when the script changes", function()
        assert.equal("one-a", body())
        proxy:rewrite_config(CONFIG, { marker = "-b" })
        h.eventually(function() return body() == "one-b" end, 8)
    end)

    it("reloads when a module the script requires changes", function()
        h.write_file(dir .. "/" .. module .. ".lua", 'return "two"')
        h.eventually(function() return body() == "two-b" end, 8)
        assert.matches("settings.watch", proxy:stderr(), 1, true)
    end)
end)
