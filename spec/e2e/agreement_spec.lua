-- moonproxy.testing agrees with the real server.
--
-- For every example configuration (examples/*.lua; static_site.lua when it
-- exists), a copy of its text with every 127.0.0.1:PORT address moved to a
-- free port (listen, admin, and one echo origin per upstream server address)
-- and the access log sent to a temp file is (1) run by the real binary with
-- one worker and (2) loaded with testing.load. The same requests, in the same
-- order, go to both: the prediction (cfg:request) must match what the origin
-- received through the real proxy (its JSON echo) or, for requests the proxy
-- answers itself, what the client received.
--
-- Compared, for a forwarded request: the server (the origin that answered,
-- by its X-Origin, mapped to its address); when the origin's JSON echo is the
-- body (not for HEAD, nor the origin's /status/NNN), the request line (method
-- + target) and the header fields the upstream receives, as a set of
-- name/values and as the exact ordered list of fields; and the response:
-- cfg:response(prediction, <the origin's own response head for that method
-- and target, fetched directly from it, with the length and body of what the
-- client got>) against the response head the client received. For a request
-- the proxy answered: status, body and response header fields.
--
-- Legitimate differences, and only these, are masked:
--   * X-Request-ID when the proxy makes it (random in the server, from the
--     seeded generator in the simulator): both must be 32 hex digits, and
--     each side must use the same id upstream and in its response. A client's
--     valid X-Request-ID is kept by both and compared exactly. A body that
--     quotes the id (api_gateway's /health) is compared with the predicted id
--     replaced by the real one.
--   * Date (the clock).
--   * X-Response-Time (examples/hooks.lua measures proxy.now() around the
--     request: a duration, "%d+.%dms" on both sides, never the same value).
--   * The ORDER of response header fields (compared as sorted lists): the
--     headers a hook gives req:respond or sets on a response come from a Lua
--     table, and LuaJIT's string hashes, hence pairs() order, differ from one
--     process to the next (`luajit -e` five times shows both orders of
--     { ["content-type"] = ..., ["cache-control"] = ... }). The fields the
--     upstream receives are set one statement at a time: their order is
--     compared.
--   X-Forwarded-For is compared exactly (the client is 127.0.0.1 on both).
--
-- Disagreements this spec found, fixed in src/sim.c: the id of a 400 for a
-- head the parser refused, proxy.on_log (the counters hooks.lua keeps), and
-- static routes.
--
-- Balancer picks: the proxy runs with one worker (-w 1) and gets the requests
-- in the same order as the simulator, freshly loaded per example, so round
-- robin, smooth weighted round robin (canary's 95:5 split) and the Lua policy
-- (sticky_tenant's least_active with its `turn` upvalue) make the same
-- sequence of choices. For a policy that reads `active` (sticky_tenant), the
-- spec waits on the admin port until no request is in flight before each
-- request, so the real balancer sees the same idle servers as the simulator.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"
local testing = require "moonproxy.testing"
local core = require "moonproxy.core"

local ALICE, BOB, MONITOR = "k-alice-7f3a", "k-bob-91cc", "k-monitor-0d2e"
local OPS = "Basic " .. "b3BzOmNoYW5nZS1tZQ==" -- ops:change-me
local OPS_BAD = "Basic " .. "b3BzOndyb25n" -- ops:wrong

-- A request: method, path, and optionally headers (a list of { name, value },
-- sent in this order to both), host (false: no Host field), body.
local function R(method, path, headers, more)
  local r = { method = method, path = path, headers = headers }
  for k, v in pairs(more or {}) do r[k] = v end
  return r
end

-- examples/hooks.lua counts into the shared dict "stats". The simulator's is
-- this busted process's (other specs may have used it): zero it, as the new
-- server's is.
local function HOOKS_RESET()
  local d = core.shared("stats", "1m")
  for _, k in ipairs { "2xx", "3xx", "4xx", "5xx", "legacy", "slow" } do d:delete(k) end
end

local EXAMPLES = {
  {
    file = "quickstart.lua",
    requests = {
      R("GET", "/api/hello?x=1"),
      R("GET", "/api/"),
      R("GET", "/healthz"),
      R("HEAD", "/healthz"),
      R("DELETE", "/healthz"),
      R("GET", "/users/42"),
      R("GET", "/users/abc"),
      R("GET", "/api/users?x=1", nil, { host = "api.example.com" }),
      R("POST", "/api/items", { { "Content-Type", "application/json" } }, { body = '{"name":"moon"}' }),
      R("PUT", "/api/items/1", { { "Content-Length", "0" } }),
      R("GET", "/page", { { "X-Forwarded-For", "203.0.113.7" }, { "X-Request-ID", "client-id.42" },
        { "Accept", "text/html" }, { "accept", "*/*" } }),
      R("GET", "/page", { { "Connection", "X-Hop, keep-alive" }, { "X-Hop", "1" }, { "Keep-Alive", "timeout=5" },
        { "TE", "trailers" }, { "X-Kept", "yes" } }),
      R("GET", "/api/a%20b?q=%2F&r=1", { { "X-Forwarded-Proto", "https" }, { "X-Forwarded-Host", "front.example" } }),
      R("GET", "/api/x?resp_header=Server:Origin/1&resp_header=X-Hop:1&conn=X-Hop&resp_header=X-Kept:yes"),
      R("GET", "/status/404"),
      R("GET", "/", nil, { host = false }), -- no Host: 400 from the parser
    },
  },
  {
    file = "api_gateway.lua",
    requests = {
      R("GET", "/users/42"),
      R("GET", "/users/42", { { "x-api-key", "k-mallory" } }),
      R("GET", "/health"),
      R("GET", "/users/42?x=1", { { "x-api-key", ALICE }, { "X-Consumer", "admin" } }),
      R("GET", "/users", { { "x-api-key", ALICE } }),
      R("GET", "/users/", { { "x-api-key", ALICE } }),
      R("GET", "/usersfoo", { { "x-api-key", ALICE } }),
      R("GET", "/no/such/path", { { "x-api-key", ALICE } }),
      R("GET", "/orders/7", { { "x-api-key", BOB } }),
      R("POST", "/orders", { { "x-api-key", ALICE }, { "Content-Type", "application/json" } }, { body = '{"item":1}' }),
      R("POST", "/orders", { { "x-api-key", ALICE }, { "Content-Length", tostring(64 * 1024 + 1) },
        { "Expect", "100-continue" } }),
      R("GET", "/search?q=moon", { { "x-api-key", BOB } }),
      R("GET", "/search/deep?q=2", { { "x-api-key", BOB } }),
      R("GET", "/health", { { "x-api-key", MONITOR } }),
      R("HEAD", "/health", { { "x-api-key", MONITOR } }),
      R("POST", "/health", { { "x-api-key", MONITOR } }, { body = "x" }),
      R("GET", "/users/1", { { "x-api-key", ALICE }, { "X-Request-ID", "order-flow:42.a_b-c" } }),
      R("GET", "/health", { { "x-api-key", MONITOR }, { "X-Request-ID", "probe-7" } }),
      R("GET", "/users/1?resp_header=X-Trace:abc", { { "x-api-key", ALICE }, { "X-Request-ID", "bad id!" } }),
    },
  },
  {
    file = "canary.lua",
    requests = (function()
      local t = {
        R("GET", "/", { { "X-Canary", "always" } }),
        R("GET", "/x?y=1", { { "X-Canary", "never" } }),
        R("GET", "/", { { "Cookie", "canary=1" } }),
        R("GET", "/", { { "Cookie", "a=1; canary=0; b=2" } }),
        R("GET", "/", { { "Cookie", "a=1" }, { "Cookie", "canary=1" } }),
        R("GET", "/", { { "Cookie", "mycanary=1; canary=10" } }),
        R("GET", "/", { { "X-Canary", "never" }, { "Cookie", "canary=1" } }),
      }
      -- the 95:5 split: 21 more, so the canary's turn comes at least once
      for i = 1, 21 do t[#t + 1] = R("GET", "/split?i=" .. i) end
      return t
    end)(),
  },
  {
    file = "blue_green.lua",
    -- the flag lives in a process-wide shared dict in both; start from none
    reset = function() core.shared("deploy", "64k"):delete("live") end,
    requests = {
      R("GET", "/"),
      R("GET", "/_live"),
      R("POST", "/_switch?to=green"),
      R("POST", "/_switch?to=green", { { "Authorization", OPS_BAD } }),
      R("POST", "/_switch?to=purple", { { "Authorization", OPS } }),
      R("GET", "/page"),
      R("POST", "/_switch?to=green", { { "Authorization", OPS }, { "Content-Length", "0" } }),
      R("GET", "/page?x=1"),
      R("GET", "/_switch?to=blue"),
      R("GET", "/_live"),
      R("POST", "/_switch?to=blue", { { "Authorization", OPS } }),
      R("GET", "/after"),
      R("GET", "/_live"),
    },
  },
  {
    file = "sticky_tenant.lua",
    wait_idle = true,
    requests = (function()
      local t = {}
      for i = 1, 6 do t[#t + 1] = R("GET", "/t?i=" .. i, { { "X-Tenant", "tenant-" .. i } }) end
      for i = 1, 3 do t[#t + 1] = R("GET", "/again?i=" .. i, { { "X-Tenant", "tenant-2" } }) end
      for i = 1, 5 do t[#t + 1] = R("GET", "/free?i=" .. i) end
      t[#t + 1] = R("GET", "/twice", { { "X-Tenant", "tenant-1" }, { "X-Tenant", "tenant-2" } })
      t[#t + 1] = R("GET", "/empty", { { "X-Tenant", "" } })
      t[#t + 1] = R("POST", "/t", { { "X-Tenant", "acme" } }, { body = "payload" })
      return t
    end)(),
  },
  {
    file = "hooks.lua",
    reset = HOOKS_RESET,
    requests = {
      R("GET", "/_stats"),
      R("GET", "/page", { { "X-Real-IP", "203.0.113.9" }, { "X-Debug", "1" },
        { "X-Maintenance-Bypass", "staff-7c1e" } }),
      R("GET", "/page", { { "Accept-Language", "fr-CH" } }),
      R("GET", "/page?resp_header=Server:Apache/2.4&resp_header=X-Powered-By:PHP/8.3&resp_header=X-Kept:yes"),
      R("GET", "/old/items/42?x=1"),
      R("GET", "/old/items/abc"),
      R("GET", "/healthz"),
      R("GET", "/old/items/7?resp_header=Server:nginx&resp_header=X-Powered-By:x"),
      R("GET", "/status/404"),
    },
  },
  {
    -- the same, in maintenance (the line the example says to edit)
    file = "hooks.lua",
    swaps = { { "local MAINTENANCE = false", "local MAINTENANCE = true" } },
    reset = HOOKS_RESET,
    requests = {
      R("GET", "/"),
      R("GET", "/page?x=1", { { "X-Maintenance-Bypass", "guess" } }),
      R("GET", "/page?x=1", { { "X-Maintenance-Bypass", "staff-7c1e" } }),
      R("GET", "/old/items/42", { { "x-maintenance-bypass", "staff-7c1e" } }),
      R("POST", "/old/items/42", nil, { body = "x" }),
      R("GET", "/healthz"),
      R("HEAD", "/healthz"),
      R("GET", "/_stats", nil, { note = "the counters kept by on_log" }),
    },
  },
}

-- static_site.lua (files served by the proxy): when it exists. Its relative
-- root resolves beside the configuration file, so the copy is written in a
-- folder of its own where the example's folders are linked (see start).
if h.read_file("examples/static_site.lua") then
  EXAMPLES[#EXAMPLES + 1] = {
    file = "static_site.lua",
    requests = {
      R("GET", "/"),
      R("GET", "/index.html"),
      R("HEAD", "/index.html"),
      R("GET", "/style.css"),
      -- revalidation with the validators the real server sent for it
      function(run) return R("GET", "/style.css", { { "If-None-Match", run.last_ok:header("etag") or "?" } }) end,
      function(run)
        return R("GET", "/style.css", { { "If-Modified-Since", run.last_ok:header("last-modified") or "?" } })
      end,
      R("GET", "/app.js"),
      R("GET", "/assets/logo.svg"),
      R("GET", "/assets"),
      R("GET", "/assets/"),
      R("GET", "/app/settings/42"),
      R("GET", "/app/style.css"),
      R("GET", "/missing.css"),
      R("POST", "/", nil, { body = "x" }),
      R("GET", "/a/../style.css"),
      R("GET", "/%2e%2e/etc/passwd"),
      R("GET", "/st%79le.css"),
      R("GET", "/api/hello?x=1"),
      R("POST", "/api/items", nil, { body = "{}" }),
    },
  }
end

--------------------------------------------------------------------------

local function is_id(v)
  return type(v) == "string" and v:match("^%x+$") ~= nil and #v == 32
end

-- The fields of a head (after its first line), as a list of { name, value }.
local function head_fields(head)
  local t = {}
  local first = true
  for line in head:gmatch("([^\r\n]*)\r\n") do
    if first then
      first = false
    elseif line ~= "" then
      local n, v = line:match("^([^:]+):[ \t]*(.-)[ \t]*$")
      t[#t + 1] = { n, v }
    end
  end
  return t
end

-- Ordered field list -> "name: value" lines, with the masked fields replaced
-- (mask: lowercase name -> function(value) returning the text to compare).
local function show(fields, mask)
  local out = {}
  for _, f in ipairs(fields) do
    local n, v = f[1], f[2]
    local m = mask and mask[n:lower()]
    if m ~= false then
      out[#out + 1] = n .. ": " .. (m and m(v) or v)
    end
  end
  return out
end

local function id_mask(v) return is_id(v) and "<generated id>" or v end
-- A traceparent's ids are drawn at random in both: their shape and flags must agree.
local function trace_mask(v)
  local flags = v:match("^00%-%x+%-%x+%-(%x%x)$")
  return v:match("^00%-" .. ("%x"):rep(32) .. "%-" .. ("%x"):rep(16) .. "%-%x%x$") and "00-<trace>-<span>-" .. flags or v
end
local function time_mask(v) return v:match("^%d+%.%dms$") and "<duration>" or v end

-- { lowercase name = value | { values } } from a list of fields.
local function field_map(fields)
  local m = {}
  for _, f in ipairs(fields) do
    local n = f[1]:lower()
    if m[n] == nil then
      m[n] = f[2]
    elseif type(m[n]) == "table" then
      table.insert(m[n], f[2])
    else
      m[n] = { m[n], f[2] }
    end
  end
  return m
end

local function describe_req(req)
  local hs = {}
  for _, f in ipairs(req.headers or {}) do hs[#hs + 1] = f[1] .. ": " .. f[2] end
  return string.format("%s %s%s%s%s%s", req.method, req.path,
    req.host == false and " (no Host)" or req.host and (" Host: " .. req.host) or "",
    #hs > 0 and (" [" .. table.concat(hs, "; ") .. "]") or "",
    req.body and (" body " .. #req.body .. " bytes") or "", req.note and (" (" .. req.note .. ")") or "")
end

-- The example's copy: every 127.0.0.1:PORT moved (listen -> ${listen},
-- admin -> ${admin}, each upstream server -> its origin, any other -> a free
-- port), the access log to ${access_log}.
local function prepare(file, swaps)
  local path = "examples/" .. file
  local text = assert(h.read_file(path))
  for _, sw in ipairs(swaps or {}) do
    local n
    text, n = text:gsub(sw[1]:gsub("%p", "%%%0"), (sw[2]:gsub("%%", "%%%%")))
    assert(n == 1, file .. ": '" .. sw[1] .. "' stands " .. n .. " times, not once")
  end
  local original = testing.load(path)
  local summary = original:summary()
  original:close()
  local role = {}
  for _, a in ipairs(summary.listen or {}) do role[a] = "${listen}" end
  if summary.admin then role[summary.admin] = "${admin}" end
  local servers, vars = {}, {}
  local names = {}
  for name in pairs(summary.upstreams or {}) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do
    for _, a in ipairs(summary.upstreams[name].servers) do
      if not role[a] then
        local var = "s" .. (#servers + 1)
        servers[#servers + 1] = { var = var, example_addr = a }
        role[a] = "${" .. var .. "}"
      end
    end
  end
  local moved = text:gsub("127%.0%.0%.1:%d+%f[%D]", function(a)
    if not role[a] then role[a] = "127.0.0.1:" .. h.free_port() end
    return role[a]
  end)
  local n
  moved, n = moved:gsub('access_log = "stdout"', 'access_log = "${access_log}"')
  assert(n <= 1, file .. ": several access_log settings")
  return moved, servers, vars
end

-- Starts the origins and the proxy on the example's copy; returns the run.
-- Fills run as it goes, so that a teardown after a failed start stops
-- whatever did start.
local function start(ex, run)
  local text, servers, vars = prepare(ex.file, ex.swaps)
  run.origins, run.by_name, run.links = {}, {}, {}
  for i, s in ipairs(servers) do
    local o = h.start_origin(s.var)
    run.origins[i] = o
    run.by_name[s.var] = o
    vars[s.var] = o.addr
  end
  if ex.reset then ex.reset() end
  -- the copy is written in a folder of its own, beside links to the
  -- example's folders (a relative path in the configuration, such as a
  -- static root, resolves beside the configuration file)
  run.dir = h.tmpname(".d")
  assert(os.execute("mkdir " .. h.quote(run.dir)) == 0)
  local cwd = assert(io.popen("pwd")):read("*l")
  local f = assert(io.popen("find examples -mindepth 1 -maxdepth 1 -type d"))
  for d in f:lines() do
    local link = run.dir .. "/" .. d:match("[^/]+$")
    assert(os.execute("ln -s " .. h.quote(cwd .. "/" .. d) .. " " .. h.quote(link)) == 0)
    run.links[#run.links + 1] = link
  end
  f:close()
  run.conf = run.dir .. "/" .. ex.file
  run.proxy = h.start_proxy { workers = 1, config = text, vars = vars, conf_path = run.conf }
  -- the very same file the proxy runs
  run.cfg = testing.load(run.proxy.conf_path)
  run.wait_idle = ex.wait_idle and run.cfg:summary().admin ~= nil
end

-- The request sent for real; returns the client's response.
local function send(run, req)
  local headers = {}
  if req.host ~= nil and req.host ~= false then headers[#headers + 1] = { "Host", req.host } end
  for _, f in ipairs(req.headers or {}) do headers[#headers + 1] = f end
  local wire = raw.build { method = req.method, target = req.path, headers = #headers > 0 and headers or nil,
    body = req.body, no_host = req.host == false }
  local res, err = raw.request(run.proxy.port, wire, { timeout = 10, method = req.method })
  assert(res, "no response from the proxy: " .. tostring(err))
  return res
end

-- The simulator's request table for req.
local function sim_req(req)
  local t = { method = req.method, path = req.path, headers = req.headers, body = req.body }
  if req.host ~= nil then t.host = req.host end
  return t
end

local function client_id(req)
  for _, f in ipairs(req.headers or {}) do
    if f[1]:lower() == "x-request-id" then return f[2] end
  end
end

local RESPONSE_MASK = { date = false, ["x-response-time"] = time_mask }

-- Compares a response the client got with the predicted one (status, fields;
-- body when given). pred_id / real_id: each side's request id. Fields are
-- compared as sorted lists: the headers a hook passes to req:respond or sets
-- on a response come from a Lua table, whose iteration order differs from
-- one Lua VM to another, so their order is no promise of the server's.
local function sorted(fields)
  local t = {}
  for _, f in ipairs(fields) do t[#t + 1] = { f[1]:lower(), f[2] } end
  table.sort(t, function(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end)
  return t
end

local function compare_response(ctx, pred_status, pred_fields, real, pred_id, real_id, pred_body)
  assert.equal(pred_status, real.status, ctx .. ": status")
  -- each side's response repeats its own request id
  local pm, rm = field_map(pred_fields), field_map(real.headers)
  assert.equal(pred_id, pm["x-request-id"], ctx .. ": predicted response X-Request-ID vs predicted id")
  assert.equal(real_id, rm["x-request-id"], ctx .. ": real response X-Request-ID vs real id")
  local mask = setmetatable({ ["x-request-id"] = id_mask }, { __index = RESPONSE_MASK })
  assert.same(show(sorted(pred_fields), mask), show(sorted(real.headers), mask), ctx .. ": response header fields")
  if pred_body ~= nil then
    if pred_id and real_id and pred_id ~= real_id and #pred_id > 0 then
      pred_body = pred_body:gsub(pred_id:gsub("%p", "%%%0"), (real_id:gsub("%%", "%%%%")))
    end
    assert.equal(pred_body, real.body, ctx .. ": response body")
  end
end

local function check(run, req)
  if run.wait_idle then run.proxy:wait_all_idle(5) end
  local predicted = run.cfg:request(sim_req(req))
  local ctx = describe_req(req) .. "\n" .. testing.format(predicted) .. "\n"
  local real = send(run, req)
  if real.status == 200 then run.last_ok = real end
  local cid = client_id(req)

  if predicted.status then -- the proxy answered by itself
    assert.is_nil(real:header("x-origin"), ctx .. ": predicted an answer from the proxy, but an origin answered:\n"
      .. tostring(real.body))
    local pred_id = field_map(head_fields(predicted.head))["x-request-id"]
    local real_id = real:header("x-request-id")
    compare_response(ctx, predicted.status, head_fields(predicted.head), real, pred_id, real_id,
      predicted.body or "")
    return "answered"
  end

  -- forwarded: X-Origin names the origin that answered
  local o = run.by_name[real:header("x-origin") or "?"]
  assert(o, ctx .. ": predicted a forward, but the proxy answered " .. real.status .. ": " .. tostring(real.body))
  assert.equal(predicted.server, o.addr, ctx .. ": server")
  local pred_fields = head_fields(predicted.head)
  local pred_id = field_map(pred_fields)["x-request-id"]
  local real_id = real:header("x-request-id")
  local method, target = predicted.method, predicted.target

  -- the origin's echo tells what it received (not for HEAD, nor /status/NNN)
  local echoed = req.method ~= "HEAD" and real.status == 200 and real:header("content-type") == "application/json"
  if echoed then
    local e = h.echo(real)
    method, target = e.method, e.target
    assert.equal(predicted.method .. " " .. predicted.target, e.method .. " " .. e.target, ctx .. ": request line")
    assert.equal(real_id, h.echo_header(e, "x-request-id"), ctx .. ": the real id, upstream and in the response")
    if cid and cid:match("^[%w%._:%-]+$") and #cid <= 128 then
      assert.equal(cid, pred_id, ctx .. ": the client's id, predicted")
      assert.equal(cid, real_id, ctx .. ": the client's id, for real")
    end
    local mask = { date = false, ["x-request-id"] = id_mask, traceparent = trace_mask }
    -- the set of fields and values, then the exact order and spelling
    local pm, em = field_map(pred_fields), field_map(e.headers)
    assert.equal(pm.traceparent and trace_mask(pm.traceparent), em.traceparent and trace_mask(em.traceparent),
      ctx .. ": traceparent")
    pm["x-request-id"], em["x-request-id"], pm.date, em.date = nil, nil, nil, nil
    pm.traceparent, em.traceparent = nil, nil
    assert.same(pm, em, ctx .. ": header set the upstream receives")
    assert.same(show(pred_fields, mask), show(e.headers, mask), ctx .. ": header fields in order")
  end
  -- the parsed map the simulator returns agrees with its own head
  local pm, rm = field_map(pred_fields), {}
  for k, v in pairs(predicted.headers) do rm[k] = v end
  assert.same(pm, rm, ctx .. ": r.headers vs r.head")

  -- the response side: the origin's own head for this request (fetched
  -- directly; it depends on the method and target only), with the body the
  -- client got, through cfg:response; the predicted response head must be
  -- the one the client received
  local direct = assert(raw.request(o.port, { method = method, target = target },
    { timeout = 10, method = method }))
  local origin_fields = {}
  for _, f in ipairs(direct.headers) do
    if f[1]:lower() == "content-length" then
      -- the length of what the origin sent through the proxy (for HEAD: what it announced)
      origin_fields[#origin_fields + 1] = { f[1], method == "HEAD" and real:header("content-length") or tostring(#real.body) }
    else
      origin_fields[#origin_fields + 1] = f
    end
  end
  local resp = run.cfg:response(predicted, { status = direct.status, headers = origin_fields, body = real.body })
  local resp_fields = {}
  for n, v in pairs(resp.headers) do
    if type(v) == "table" then
      for _, x in ipairs(v) do resp_fields[#resp_fields + 1] = { n, x } end
    else
      resp_fields[#resp_fields + 1] = { n, v }
    end
  end
  compare_response(ctx .. "(response) " .. testing.format(resp) .. "\n", resp.status, resp_fields, real,
    pred_id, real_id, nil)
  return "forwarded"
end

--------------------------------------------------------------------------

describe("moonproxy.testing agrees with the real server on", function()
  for _, ex in ipairs(EXAMPLES) do
    describe("examples/" .. ex.file .. (ex.swaps and (" with " .. ex.swaps[1][2]) or ""), function()
      local run = {}

      lazy_setup(function()
        start(ex, run)
      end)

      lazy_teardown(function()
        if run.cfg then run.cfg:close() end
        h.shutdown(run.proxy, unpack(run.origins or {}))
        for _, l in ipairs(run.links or {}) do os.remove(l) end
        if run.conf then os.remove(run.conf) end
        if run.dir then os.remove(run.dir) end
        if ex.reset then ex.reset() end
      end)

      for i, req in ipairs(ex.requests) do
        local label = type(req) == "function" and "(with a validator from the last 200)" or describe_req(req)
        it(string.format("%2d. %s", i, label), function()
          if type(req) == "function" then req = req(run) end
          check(run, req)
        end)
      end
    end)
  end

  if not h.read_file("examples/static_site.lua") then
    pending("examples/static_site.lua does not exist yet")
  end
end)
