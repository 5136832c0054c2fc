-- The status page drawn by a real browser: Debian's chromium, headless
-- (make test-browser installs it; `make test` leaves this file out). The
-- page's script fetches /status and builds its tables and graphs: the DOM
-- after it ran names every upstream, server and route, and a screenshot at
-- a phone's size has that size and is not blank.
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"

local CONFIG = [=[
local proxy = require "moonproxy"
proxy.listen { addr = "${listen}" }
proxy.admin { addr = "${admin}" }
proxy.settings { access_log = false }
local shop = proxy.upstream "shop-backend" { servers = { "${origin}" } }
local auth = proxy.upstream "auth-service" { servers = { "127.0.0.1:${dead}" } }
proxy.route { name = "storefront", prefix = "/shop/", upstream = shop }
proxy.route { name = "login", prefix = "/login", upstream = auth }
]=]

local CHROMIUM = { "chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
  "--no-first-run", "--virtual-time-budget=5000" }

local function chromium(args)
  local argv = {}
  for _, a in ipairs(CHROMIUM) do argv[#argv + 1] = h.quote(a) end
  for _, a in ipairs(args) do argv[#argv + 1] = h.quote(a) end
  return h.run("timeout 90 " .. table.concat(argv, " ") .. " 2>/dev/null", 100)
end

-- The width and height of a PNG (its IHDR chunk).
local function png_size(bytes)
  assert.equal("\137PNG\r\n\26\n", bytes:sub(1, 8))
  local function be32(i)
    local a, b, c, d = bytes:byte(i, i + 3)
    return ((a * 256 + b) * 256 + c) * 256 + d
  end
  return be32(17), be32(21)
end

describe("the status page in a browser", function()
  local origin, proxy, url

  lazy_setup(function()
    origin = h.start_origin("shop")
    proxy = h.start_proxy { workers = 2, config = CONFIG, vars = { origin = origin.addr, dead = h.free_port() } }
    proxy:wait_ready()
    for i = 1, 20 do raw.get(proxy.port, "/shop/item" .. i) end
    for _ = 1, 3 do raw.get(proxy.port, "/login") end
    url = "http://127.0.0.1:" .. proxy.admin_port .. "/"
  end)

  lazy_teardown(function()
    h.shutdown(proxy, origin)
  end)

  it("renders every upstream, server and route from /status", function()
    local dom, rc = chromium { "--dump-dom", url }
    assert.equal(0, rc, dom)
    for _, name in ipairs { "shop-backend", "auth-service", origin.addr, "storefront", "login" } do
      assert.truthy(dom:find("<td>" .. name .. "</td>", 1, true), "not in the page: " .. name .. "\n" .. dom)
    end
    assert.truthy(dom:find("<polyline", 1, true), "no graph drawn")
    assert.truthy(dom:find("generation 1", 1, true))
    assert.truthy(dom:find('id="meta">moonproxy ', 1, true), "the summary line was not drawn") -- not an error
  end)

  it("fits a phone's screen in a screenshot that is not blank", function()
    local shot = h.tmpname(".png")
    local out, rc = chromium { "--window-size=412,915", "--screenshot=" .. shot, url }
    assert.equal(0, rc, out)
    local png = assert(h.read_file(shot), "no screenshot")
    os.remove(shot)
    local w, ht = png_size(png)
    assert.same({ 412, 915 }, { w, ht })
    assert.truthy(#png > 10000, "a screenshot of " .. #png .. " bytes: blank?")
  end)
end)
