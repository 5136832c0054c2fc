-- moonproxy.testing on static routes' ranges and precompressed files: the
-- simulator runs the server's static.c, so it answers what the server does
-- (spec/e2e/static_range_spec.lua checks the server).
local testing = require "moonproxy.testing"
local h = require "helpers.proxy"

describe("moonproxy.testing static ranges and precompressed files", function()
  local dir, cfg

  lazy_setup(function()
    dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. h.quote(dir .. "/pub")))
    h.write_file(dir .. "/pub/a.txt", "0123456789")
    h.write_file(dir .. "/pub/a.txt.gz", "GZ-bytes")
    cfg = testing.load(h.write_file(dir .. "/proxy.lua", [[
local proxy = require "moonproxy"
proxy.listen { addr = "127.0.0.1:18080" }
proxy.route { prefix = "/z/", strip_prefix = true, static = { root = "pub", precompressed = true } }
proxy.route { prefix = "/", static = { root = "pub" } }
]]))
  end)

  lazy_teardown(function()
    if cfg then cfg:close() end
    if dir then h.run("rm -rf " .. h.quote(dir)) end
  end)

  it("answers a range 206 with its slice, and one past the end 416", function()
    local r = cfg:request { path = "/a.txt", headers = { range = "bytes=2-4" } }
    assert.same({ 206, "234", "bytes 2-4/10" }, { r.status, r.body, r.headers["content-range"] })
    local past = cfg:request { path = "/a.txt", headers = { range = "bytes=10-" } }
    assert.same({ 416, "bytes */10" }, { past.status, past.headers["content-range"] })
  end)

  it("serves the precompressed sibling the client accepts", function()
    local r = cfg:request { path = "/z/a.txt", headers = { ["accept-encoding"] = "gzip" } }
    assert.same({ 200, "GZ-bytes", "gzip", "Accept-Encoding" },
      { r.status, r.body, r.headers["content-encoding"], r.headers.vary })
    assert.equal("0123456789", cfg:request({ path = "/z/a.txt" }).body)
  end)
end)
