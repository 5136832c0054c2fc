-- End-to-end: W3C Trace Context (README "Traces"). Every request carries a
-- trace: a trusted client's valid traceparent is continued (trace id and
-- sampled flag kept, tracestate passed on), any other starts one (sampled at
-- tracing.sample, tracestate dropped); the upstream receives traceparent
-- with the proxy's own span id; hooks see req.trace_id and req.span_id; the
-- access log has both.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.settings { access_log = "${access_log}", trusted_proxies = { ${trusted} }, tracing = { sample = ${sample}${trust} } }
local o = proxy.upstream "o" { servers = { "${origin}" } }
proxy.route { prefix = "/", upstream = o, on_request = function(req)
  req.headers["x-hook-trace"] = req.trace_id .. "/" .. req.span_id
end }
]=]

local PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

local function parse(tp)
  local v, t, s, f = (tp or ""):match("^(%x%x)%-(%x+)%-(%x+)%-(%x%x)$")
  return { version = v, trace = t, span = s, flags = f }
end

describe("trace context", function()
  local origin

  lazy_setup(function() origin = h.start_origin("o") end)
  lazy_teardown(function() h.shutdown(nil, origin) end)

  local function start(vars)
    local v = { origin = origin.addr, trusted = '"127.0.0.1/32"', sample = 0, trust = "" }
    for k, x in pairs(vars or {}) do v[k] = x end
    return h.start_proxy { workers = 1, config = CONFIG, vars = v }
  end

  local function get(proxy, headers)
    local res = assert(raw.get(proxy.port, "/t", headers, { timeout = 5 }))
    local e = h.echo(res)
    return e, res
  end

  it("starts a trace for a request without one, the proxy's span going upstream", function()
    local p = start()
    finally(function() h.shutdown(p) end)
    local e = get(p)
    local tp = parse(h.echo_header(e, "traceparent"))
    assert.same({ "00", 32, 16, "00" }, { tp.version, #tp.trace, #tp.span, tp.flags }) -- sample = 0: not sampled
    assert.equal(tp.trace .. "/" .. tp.span, h.echo_header(e, "x-hook-trace"))
    local e2 = get(p)
    assert.not_equal(tp.trace, parse(h.echo_header(e2, "traceparent")).trace)
    local entries = h.eventually(function()
      local t = p:access_log_entries()
      return #t >= 2 and t
    end, 5)
    assert.same({ tp.trace, tp.span }, { entries[1].trace_id, entries[1].span_id })
  end)

  it("continues a trusted client's valid traceparent, with its tracestate", function()
    local p = start()
    finally(function() h.shutdown(p) end)
    local e = get(p, { { "traceparent", PARENT }, { "tracestate", "vendor=abc,x=1" } })
    local tp = parse(h.echo_header(e, "traceparent"))
    assert.same({ "4bf92f3577b34da6a3ce929d0e0e4736", "01" }, { tp.trace, tp.flags })
    assert.not_equal("00f067aa0ba902b7", tp.span) -- the proxy's own span
    assert.equal("vendor=abc,x=1", h.echo_header(e, "tracestate"))
    assert.same({ h.echo_header(e, "traceparent") }, h.echo_headers(e, "traceparent")) -- one, ours
    -- a later version's traceparent with more fields is continued too
    local later = parse(h.echo_header(get(p, { { "traceparent", "cc-" .. PARENT:sub(4) .. "-more" } }), "traceparent"))
    assert.same({ "00", "4bf92f3577b34da6a3ce929d0e0e4736" }, { later.version, later.trace })
  end)

  it("starts anew on an invalid traceparent, or one from a client it does not trust, dropping tracestate", function()
    local p = start()
    finally(function() h.shutdown(p) end)
    for _, bad in ipairs {
      "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", -- uppercase
      "00-00000000000000000000000000000000-00f067aa0ba902b7-01", -- zero trace id
      "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", -- zero parent id
      "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", -- version ff
      PARENT .. "-extra",                                        -- version 00 with more
      "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  -- short
    } do
      local e = get(p, { { "traceparent", bad }, { "tracestate", "vendor=abc" } })
      local tp = parse(h.echo_header(e, "traceparent"))
      assert.not_equal("4bf92f3577b34da6a3ce929d0e0e4736", tp.trace, bad)
      assert.equal(32, #tp.trace, bad)
      assert.is_nil(h.echo_header(e, "tracestate"), bad)
    end
    local two = get(p, { { "traceparent", PARENT }, { "traceparent", PARENT } }) -- repeated: invalid
    assert.not_equal("4bf92f3577b34da6a3ce929d0e0e4736", parse(h.echo_header(two, "traceparent")).trace)
    local q = start({ trust = ', trust = { "10.0.0.0/8" }' }) -- tracing.trust, not trusted_proxies, decides
    finally(function() h.shutdown(q) end)
    local e = get(q, { { "traceparent", PARENT } })
    assert.not_equal("4bf92f3577b34da6a3ce929d0e0e4736", parse(h.echo_header(e, "traceparent")).trace)
  end)

  it("flags new traces sampled at tracing.sample", function()
    local all = start({ sample = 1 })
    finally(function() h.shutdown(all) end)
    assert.equal("01", parse(h.echo_header(get(all), "traceparent")).flags)
    local half = start({ sample = 0.5 })
    finally(function() h.shutdown(half) end)
    local sampled, n = 0, 400
    local c = assert(raw.connect(half.port, { timeout = 5 }))
    for _ = 1, n do
      local e = h.echo(assert(c:request({ method = "GET", target = "/s" })))
      if parse(h.echo_header(e, "traceparent")).flags == "01" then sampled = sampled + 1 end
    end
    c:close()
    assert.truthy(sampled > 140 and sampled < 260, sampled .. " of " .. n .. " sampled at 0.5") -- > 7 sigma
    -- an unsampled parent stays unsampled, whatever the ratio
    local e = get(all, { { "traceparent", PARENT:sub(1, -3) .. "00" } })
    assert.equal("00", parse(h.echo_header(e, "traceparent")).flags)
  end)

  it("refuses a sample outside 0..1 with file:line", function()
    local path = h.write_file(h.tmpname(".lua"), 'local proxy = require "moonproxy"\n' ..
      'proxy.listen { addr = "127.0.0.1:1" }\nproxy.settings { tracing = { sample = 2 } }\n')
    local out, rc = h.run(h.quote(h.bin()) .. " -t -c " .. h.quote(path))
    assert.are_not.equal(0, rc)
    assert.matches(":3: ", out, 1, true)
    assert.matches("sample", out, 1, true)
  end)
end)
