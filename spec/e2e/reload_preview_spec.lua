-- End-to-end: a reload you can preview (SPEC "Operations"). POST
-- /reload?dry_run=1 loads and checks the script on disk (guards included)
-- and answers what would change, applying nothing: the generation stays and
-- traffic goes on as before. Each kind of change is reported (routes,
-- upstreams, servers, plugins, settings, the settings only a restart applies); a
-- refused script's error has its file:line; a real reload logs the same
-- summary in its one line; `moonproxy -t --diff --against FILE` prints it
-- offline, certificates by digest included.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local tls = require "helpers.tls"
local cjson = require "cjson"

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false${settings} }
proxy.route { prefix = "/a/", strip_prefix = true, upstream = proxy.upstream "api" { servers = { ${servers} }${api} } }
${routes}
]=]

local OLD_ROUTE = 'proxy.route { name = "old", path = "/old", handler = function(req) return req:respond(200, "old") end }'

describe("reload preview", function()
    local a, b, proxy, base

    local function vars(over)
        local v = { settings = "", servers = '"' .. a.addr .. '"', api = "", routes = OLD_ROUTE }
        for k, x in pairs(over or {}) do v[k] = x end
        return v
    end

    lazy_setup(function()
        a = h.start_origin("a")
        b = h.start_origin("b")
        base = vars()
        proxy = h.start_proxy { workers = 2, config = CONFIG, vars = base }
        proxy:wait_ready()
    end)

    lazy_teardown(function()
        h.shutdown(proxy, a, b)
    end)

    local function generation()
        local res, doc = proxy:admin("GET", "/configz")
        assert.equal(200, res.status)
        return doc.generation
    end

    local function preview()
        local res, doc = proxy:admin("POST", "/reload?dry_run=1")
        assert(res, doc)
        return res, doc
    end

    -- A list of strings (or { name = } objects) as a set of names.
    local function names(list)
        local t = {}
        for _, x in ipairs(list) do t[#t + 1] = type(x) == "table" and x.name or x end
        table.sort(t)
        return t
    end

    local function fields(list, name)
        for _, x in ipairs(list) do
            if type(x) == "table" and x.name == name then
                local f = { unpack(x.fields) }
                table.sort(f)
                return f
            end
        end
    end

    after_each(function()
        proxy:rewrite_config(CONFIG, base)
    end)

    it("reports no changes for the running script, and changes nothing", function()
        local gen = generation()
        local res, doc = preview()
        assert.equal(200, res.status, res.body)
        assert.is_true(doc.dry_run)
        assert.equal(0, doc.changes)
        assert.equal("no changes", doc.summary)
        assert.equal(gen, doc.generation)
        assert.equal(gen, generation())
    end)

    it("reports each kind of change without applying it", function()
        local gen = generation()
        proxy:rewrite_config(CONFIG, vars {
            settings = ", workers = 3, max_body_size = 12345",
            servers = string.format('{ addr = "%s", weight = 4 }, "%s"', a.addr, b.addr),
            api = ", retries = 5",
            routes = 'proxy.route { prefix = "/w/", upstream = proxy.upstream "web" { servers = { "' .. b.addr .. '" } } }',
        })
        local res, doc = preview()
        assert.equal(200, res.status, res.body)
        local d = doc.diff
        assert.same({ "/w/" }, names(d.routes.added))
        assert.same({ "old" }, names(d.routes.removed))
        assert.same({}, d.routes.changed)
        assert.same({ "web" }, names(d.upstreams.added))
        assert.same({ "retries" }, fields(d.upstreams.changed, "api"))
        assert.same({ "api " .. b.addr, "web " .. b.addr }, names(d.servers.added))
        assert.same({ "weight" }, fields(d.servers.changed, "api " .. a.addr))
        assert.same({ "max_body_size", "workers" }, names(d.settings.changed))
        assert.same({ "workers" }, doc.diff.restart_required)
        assert.equal(9, doc.changes) -- routes 2, upstreams 2, servers 3, settings 2
        assert.truthy(doc.summary:find("only a restart applies: workers", 1, true))
        -- nothing applied: same generation, the old route answers, the new one does not exist
        assert.equal(gen, doc.generation)
        assert.equal(gen, generation())
        assert.equal("old", assert(raw.get(proxy.port, "/old")).body)
        assert.equal(404, assert(raw.get(proxy.port, "/w/x")).status)
        local st = proxy:server_state("api", a.addr)
        assert.equal(1, st.weight)
        assert.is_nil(proxy:server_state("api", b.addr))
    end)

    it("reports a changed route's fields", function()
        proxy:rewrite_config(CONFIG, vars {
            routes = 'proxy.route { name = "old", prefix = "/old/", upstream = "api" }' })
        local _, doc = preview()
        assert.same({ "handler", "path", "prefix", "upstream" }, fields(doc.diff.routes.changed, "old"))
    end)

    it("reports plugins added, removed and with changed options, global and by route", function()
        proxy:rewrite_config(CONFIG, vars { api = "", routes = OLD_ROUTE ..
            '\nproxy.plugin { "request_size", max = 100 }' ..
            '\nproxy.route { prefix = "/k/", upstream = "api", plugins = { { "key_auth", keys = { "k1" } } } }' })
        assert.equal(200, assert(proxy:admin("POST", "/reload")).status)
        base = vars { routes = OLD_ROUTE .. '\nproxy.plugin { "request_size", max = 100 }' ..
            '\nproxy.route { prefix = "/k/", upstream = "api", plugins = { { "key_auth", keys = { "k1" } } } }' }
        proxy:rewrite_config(CONFIG, vars { routes = OLD_ROUTE ..
            '\nproxy.plugin { "request_size", max = 200 }\nproxy.plugin { "cors", origins = "*" }' ..
            '\nproxy.route { prefix = "/k/", upstream = "api" }' })
        local res, doc = preview()
        assert.equal(200, res.status, res.body)
        local p = doc.diff.plugins
        assert.same({ "cors" }, names(p.added))
        assert.same({ "key_auth on /k/" }, names(p.removed))
        assert.same({ "options" }, fields(p.changed, "request_size"))
        assert.equal("plugins: ~request_size(options) +cors -key_auth on /k/", doc.summary)
        base = vars() -- back to the script the other specs start from
        proxy:rewrite_config(CONFIG, base)
        assert.equal(200, assert(proxy:admin("POST", "/reload")).status)
    end)

    it("answers a refused script's error with its file:line, and a failing guard", function()
        local gen = generation()
        proxy:rewrite_config(CONFIG, vars { routes = 'proxy.route { prefix = "/x/", upstream = "nope" }' })
        local res, doc = preview()
        assert.equal(422, res.status)
        assert.is_true(doc.dry_run)
        assert.truthy(doc.error:find(proxy.conf_path:match("[^/]+$") .. ":6:", 1, true), doc.error)
        assert.equal(gen, doc.generation)
        proxy:rewrite_config(CONFIG, vars { routes = OLD_ROUTE ..
            '\nproxy.expect { request = { path = "/old" }, status = 201 }' })
        res, doc = preview()
        assert.equal(422, res.status, res.body)
        assert.truthy(doc.error:find(":7:", 1, true), doc.error)
        assert.equal(gen, generation())
    end)

    it("leaves traffic alone while previewing under load", function()
        proxy:rewrite_config(CONFIG, vars { servers = '"' .. b.addr .. '"' })
        local results, counts = h.load(proxy.port, { total = 200, concurrency = 4, request = function(i)
            if i % 50 == 0 then assert.equal(200, (preview()).status) end
            return { target = "/a/x?i=" .. i }
        end })
        for i = 1, 200 do assert.equal(200, results[i].status) end
        assert.same({ a = 200 }, counts)
    end)

    it("a real reload logs the same summary in its one line", function()
        proxy:rewrite_config(CONFIG, vars { api = ", retries = 4" })
        local _, doc = preview()
        assert.equal("upstreams: ~api(retries)", doc.summary)
        local res = assert(proxy:admin("POST", "/reload"))
        assert.equal(200, res.status, res.body)
        local gen = cjson.decode(res.body).generation
        h.eventually(function()
            return proxy:log_count("reload: generation " .. gen .. " loaded (POST /reload): upstreams: ~api(retries)") == 1
        end, 5)
        base = vars { api = ", retries = 4" } -- what runs now
        local _, again = preview()
        assert.equal(0, again.changes)
    end)
end)

describe("moonproxy -t --diff --against", function()
    local pki, dir

    lazy_setup(function()
        pki = tls.pki()
        dir = h.tmpname(".diff")
        assert(os.execute("mkdir -p " .. h.quote(dir)) == 0)
    end)

    lazy_teardown(function()
        pki:remove()
        os.execute("rm -rf " .. h.quote(dir))
    end)

    local SCRIPT = [[
local proxy = require "moonproxy"
proxy.listen { addr = "127.0.0.1:18443", tls = { cert = "%s", key = "%s" } }
proxy.settings { access_log = %s }
proxy.route { prefix = "/", upstream = proxy.upstream "api" { servers = { %s } } }
]]

    local function script(name, pair, alog, servers)
        return h.write_file(dir .. "/" .. name, SCRIPT:format(pair.cert, pair.key, alog, servers))
    end

    local function sha256(cert)
        local out = h.run("openssl x509 -in " .. h.quote(cert) .. " -noout -fingerprint -sha256")
        return (out:match("=([%x:]+)"):gsub(":", ""):lower())
    end

    local function moonproxy(args)
        return h.run(h.quote(h.bin()) .. " " .. args .. " 2>&1")
    end

    it("prints what a reload from FILE would change, certificates by digest", function()
        local old = script("old.lua", pki.localhost, "false", '"127.0.0.1:9001", "127.0.0.1:9002"')
        local new = script("new.lua", pki.api, '"' .. dir .. '/access.log"', '"127.0.0.1:9001", "127.0.0.1:9003"')
        local out, code = moonproxy("-t --diff --against " .. h.quote(old) .. " -c " .. h.quote(new))
        assert.equal(0, code, out)
        local lines = {}
        for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
        assert.equal("ok", lines[1])
        assert.equal("servers: +api 127.0.0.1:9003 -api 127.0.0.1:9002", lines[2])
        assert.equal(string.format("certificates: +%s api.example.test -%s localhost", sha256(pki.api.cert),
            sha256(pki.localhost.cert)), lines[3])
        assert.equal("settings: ~access_log", lines[4])
        assert.equal("only a restart applies: access_log", lines[5])
        assert.equal(5, #lines)
        local plugin = h.write_file(dir .. "/plugin.lua", SCRIPT:format(pki.localhost.cert, pki.localhost.key, "false",
            '"127.0.0.1:9001", "127.0.0.1:9002"') .. 'proxy.plugin { "request_size", max = 10 }\n')
        out, code = moonproxy("-t --diff --against " .. h.quote(old) .. " -c " .. h.quote(plugin))
        assert.equal(0, code, out)
        assert.equal("ok\nplugins: +request_size\n", out)
        out, code = moonproxy("-t --diff --against " .. h.quote(old) .. " -c " .. h.quote(old))
        assert.equal(0, code, out)
        assert.equal("ok\nno changes\n", out)
    end)

    it("refuses a bad FILE with its error, and --diff without --against", function()
        local good = script("good.lua", pki.localhost, "false", '"127.0.0.1:9001"')
        local bad = h.write_file(dir .. "/bad.lua", 'local proxy = require "moonproxy"\nproxy.route { prefix = "/" }\n')
        local out, code = moonproxy("-t --diff --against " .. h.quote(bad) .. " -c " .. h.quote(good))
        assert.are_not.equal(0, code)
        assert.truthy(out:find("bad.lua:2:", 1, true), out)
        out, code = moonproxy("-t --diff -c " .. h.quote(good))
        assert.equal(2, code, out)
        assert.truthy(out:find("--against", 1, true), out)
    end)
end)
