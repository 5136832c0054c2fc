-- moonproxy.testing's server control (cfg:server_state, and drain/weight in
-- opts.servers): the simulator's balancer picks honour drain, down and
-- weight as the running server's do after POST /upstreams/NAME/servers/ADDR.
local testing = require "moonproxy.testing"

local TEXT = [[
local proxy = require "moonproxy"
proxy.listen { addr = "127.0.0.1:18080" }
proxy.route { prefix = "/", upstream = proxy.upstream "api" {
  servers = { "127.0.0.1:9001", "127.0.0.1:9002" }, balancer = "weighted" } }
]]

local A, B = "127.0.0.1:9001", "127.0.0.1:9002"

describe("moonproxy.testing server control", function()
  local cfg

  before_each(function()
    cfg = testing.load(TEXT, { text = true })
  end)

  after_each(function()
    cfg:close()
  end)

  local function picks(n)
    local counts = {}
    for i = 1, n do
      local s = cfg:request({ path = "/x?i=" .. i }).server
      counts[s or "none"] = (counts[s or "none"] or 0) + 1
    end
    return counts
  end

  it("drain and down take a server out of the picks; false undoes them", function()
    assert.same({ [A] = 5, [B] = 5 }, picks(10))
    cfg:server_state("api", A, { drain = true })
    assert.same({ [B] = 10 }, picks(10))
    local trace = cfg:request({ path = "/t" }).trace
    local text = {}
    for _, s in ipairs(trace) do text[#text + 1] = s.text end
    assert.truthy(table.concat(text, "\n"):find(A .. " (draining", 1, true))
    cfg:server_state("api", A, { drain = false })
    cfg:server_state("api", B, { down = true })
    assert.same({ [A] = 10 }, picks(10))
    cfg:server_state("api", B, { down = false })
    assert.same({ [A] = 5, [B] = 5 }, picks(10))
  end)

  it("with one server drained and the other down, a request is answered 503", function()
    cfg:server_state("api", A, { drain = true })
    cfg:server_state("api", B, { down = true })
    local r = cfg:request({ path = "/x" })
    assert.is_nil(r.server)
    assert.equal(503, r.status)
  end)

  it("weight shifts the weighted share, and reset puts the configuration back", function()
    cfg:server_state("api", B, { weight = 3 })
    assert.same({ [A] = 10, [B] = 30 }, picks(40))
    cfg:server_state("api", B, { reset = true })
    assert.same({ [A] = 20, [B] = 20 }, picks(40))
  end)

  it("opts.servers takes drain and weight too", function()
    cfg:close()
    cfg = testing.load(TEXT, { text = true, servers = { api = { [A] = { weight = 4 } } } })
    assert.same({ [A] = 40, [B] = 10 }, picks(50))
    cfg:servers { api = { [A] = { drain = true } } }
    assert.same({ [B] = 10 }, picks(10))
  end)

  it("refuses an unknown server, field or bad weight", function()
    assert.has_error(function() cfg:server_state("api", "127.0.0.1:1", { drain = true }) end)
    assert.has_error(function() cfg:server_state("nope", A, { drain = true }) end)
    assert.has_error(function() cfg:server_state("api", A, { colour = "red" }) end)
    assert.has_error(function() cfg:server_state("api", A, { weight = 0 }) end)
    assert.has_error(function() cfg:server_state("api", A, { weight = 1.5 }) end)
    assert.has_error(function() cfg:server_state("api", A, { drain = "yes" }) end)
    assert.same({ [A] = 5, [B] = 5 }, picks(10))
  end)
end)
