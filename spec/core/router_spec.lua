-- core.router(): the C route table (src/router.c) against SPEC "Routes".
local core = require "moonproxy.core"

-- A router from route tables; fails the test when the table is refused.
local function build(routes)
  local r, err = core.router(routes)
  assert(r, err)
  return r
end

-- The name of the route that q selects, or nil.
local function pick(r, q)
  local m = r:match(q)
  return m and m.name
end

describe("core.router() host groups", function()
  it("tries an exact host before a wildcard host", function()
    local r = build {
      { name = "wild", host = "*.example.com" },
      { name = "exact", host = "api.example.com" },
    }
    assert.equal("exact", pick(r, { host = "api.example.com", path = "/" }))
  end)

  it("tries a wildcard host before routes without a host", function()
    local r = build {
      { name = "any" },
      { name = "wild", host = "*.example.com" },
    }
    assert.equal("wild", pick(r, { host = "www.example.com", path = "/" }))
  end)

  it("prefers the host group even over a more specific path elsewhere", function()
    local r = build {
      { name = "any-exact", path = "/login" },
      { name = "host-root", host = "api.example.com", prefix = "/" },
    }
    assert.equal("host-root", pick(r, { host = "api.example.com", path = "/login" }))
  end)

  it("falls through from the exact host group to the wildcard group", function()
    local r = build {
      { name = "exact", host = "api.example.com", prefix = "/v1/" },
      { name = "wild", host = "*.example.com", prefix = "/v2/" },
    }
    assert.equal("wild", pick(r, { host = "api.example.com", path = "/v2/x" }))
  end)

  it("falls through to routes without a host when the host groups do not match", function()
    local r = build {
      { name = "exact", host = "api.example.com", path = "/a" },
      { name = "wild", host = "*.example.com", path = "/b" },
      { name = "any", prefix = "/" },
    }
    assert.equal("any", pick(r, { host = "api.example.com", path = "/c" }))
  end)

  it("falls through to routes without a host when host routes' filters fail", function()
    local r = build {
      { name = "exact", host = "api.example.com", methods = { "POST" } },
      { name = "any" },
    }
    assert.equal("any", pick(r, { host = "api.example.com", method = "GET", path = "/" }))
  end)

  it("never selects a host route for another host", function()
    local r = build { { name = "exact", host = "api.example.com" } }
    assert.is_nil(pick(r, { host = "www.example.com", path = "/" }))
  end)

  it("selects only routes without a host when the request has none", function()
    local r = build {
      { name = "exact", host = "api.example.com" },
      { name = "any", prefix = "/" },
    }
    assert.equal("any", pick(r, { path = "/" }))
  end)

  it("compares the request host case-insensitively", function()
    local r = build { { name = "exact", host = "api.example.com" } }
    assert.equal("exact", pick(r, { host = "API.Example.COM", path = "/" }))
  end)

  it("compares the configured host case-insensitively", function()
    local r = build { { name = "exact", host = "Api.EXAMPLE.com" } }
    assert.equal("exact", pick(r, { host = "api.example.com", path = "/" }))
  end)

  it("compares wildcard hosts case-insensitively", function()
    local r = build { { name = "wild", host = "*.Example.com" } }
    assert.equal("wild", pick(r, { host = "WWW.EXAMPLE.COM", path = "/" }))
  end)

  it("ignores the port of the request host", function()
    local r = build { { name = "exact", host = "api.example.com" } }
    assert.equal("exact", pick(r, { host = "api.example.com:8080", path = "/" }))
  end)

  it("ignores the port of an IPv6 literal host", function()
    local r = build { { name = "v6", host = "[::1]" } }
    assert.equal("v6", pick(r, { host = "[::1]:8080", path = "/" }))
  end)

  it("treats a trailing dot in the host as the same name", function()
    local r = build { { name = "exact", host = "api.example.com" } }
    assert.equal("exact", pick(r, { host = "api.example.com.:80", path = "/" }))
  end)

  it("does not match the bare domain with a wildcard", function()
    local r = build { { name = "wild", host = "*.example.com" } }
    assert.is_nil(pick(r, { host = "example.com", path = "/" }))
  end)

  it("does not match a name that merely ends like the domain", function()
    local r = build { { name = "wild", host = "*.example.com" } }
    assert.is_nil(pick(r, { host = "badexample.com", path = "/" }))
  end)

  it("matches a wildcard at any depth", function()
    local r = build { { name = "wild", host = "*.example.com" } }
    assert.equal("wild", pick(r, { host = "a.b.c.example.com", path = "/" }))
  end)

  it("tries the longest wildcard suffix first", function()
    local r = build {
      { name = "short", host = "*.example.com" },
      { name = "long", host = "*.eu.example.com" },
    }
    assert.equal("long", pick(r, { host = "api.eu.example.com", path = "/" }))
  end)

  it("falls back to a shorter wildcard suffix when the longer one has no match", function()
    local r = build {
      { name = "short", host = "*.example.com" },
      { name = "long", host = "*.eu.example.com", path = "/only" },
    }
    assert.equal("short", pick(r, { host = "api.eu.example.com", path = "/other" }))
  end)
end)

describe("core.router() paths in one host group", function()
  it("tries an exact path before a regex", function()
    local r = build {
      { name = "regex", regex = "^/users/\\d+$" },
      { name = "exact", path = "/users/42" },
    }
    assert.equal("exact", pick(r, { path = "/users/42" }))
  end)

  it("tries an exact path before a prefix of the same text", function()
    local r = build {
      { name = "prefix", prefix = "/login" },
      { name = "exact", path = "/login" },
    }
    assert.equal("exact", pick(r, { path = "/login" }))
  end)

  it("matches an exact path only as a whole", function()
    local r = build { { name = "exact", path = "/login" } }
    assert.is_nil(pick(r, { path = "/login/" }))
  end)

  it("tries regex routes before a longer prefix", function()
    local r = build {
      { name = "prefix", prefix = "/users/42" },
      { name = "regex", regex = "^/users/" },
    }
    assert.equal("regex", pick(r, { path = "/users/42" }))
  end)

  it("never lets a catch-all prefix \"/\" hide a regex route", function()
    local r = build {
      { name = "all", prefix = "/" },
      { name = "regex", regex = "^/users/(\\d+)$" },
    }
    assert.equal("regex", pick(r, { path = "/users/7" }))
  end)

  it("tries regex routes in declaration order", function()
    local r = build {
      { name = "first", regex = "^/a" },
      { name = "second", regex = "^/a/b" },
    }
    assert.equal("first", pick(r, { path = "/a/b" }))
  end)

  it("tries the longest prefix first whatever the declaration order", function()
    local r = build {
      { name = "short", prefix = "/api/" },
      { name = "long", prefix = "/api/v1/" },
    }
    assert.equal("long", pick(r, { path = "/api/v1/users" }))
  end)

  it("matches a prefix without '/' against the path itself", function()
    local r = build { { name = "v1", prefix = "/v1" } }
    assert.equal("v1", pick(r, { path = "/v1" }))
  end)

  it("matches a prefix without '/' against the path followed by '/'", function()
    local r = build { { name = "v1", prefix = "/v1" } }
    assert.equal("v1", pick(r, { path = "/v1/x" }))
  end)

  it("does not match a prefix without '/' inside a longer segment", function()
    local r = build { { name = "v1", prefix = "/v1" } }
    assert.is_nil(pick(r, { path = "/v1x" }))
  end)

  it("matches a prefix ending in '/' by string", function()
    local r = build { { name = "static", prefix = "/static/" } }
    assert.equal("static", pick(r, { path = "/static/css/site.css" }))
  end)

  it("does not match a prefix ending in '/' against the path without it", function()
    local r = build { { name = "v1", prefix = "/v1/" } }
    assert.is_nil(pick(r, { path = "/v1" }))
  end)

  it("prefers \"/v1/\" over \"/v1\" for a path below it", function()
    local r = build {
      { name = "bare", prefix = "/v1" },
      { name = "slash", prefix = "/v1/" },
    }
    assert.equal("slash", pick(r, { path = "/v1/x" }))
  end)

  it("matches a prefix several segments above the path", function()
    local r = build { { name = "ab", prefix = "/a/b" } }
    assert.equal("ab", pick(r, { path = "/a/b/c/d/e" }))
  end)

  it("matches a prefix ending in a partial segment only at a boundary", function()
    local r = build { { name = "ab", prefix = "/a/b" } }
    assert.is_nil(pick(r, { path = "/a/bc/d" }))
  end)

  it("handles empty segments in the path", function()
    local r = build { { name = "a", prefix = "/a/" } }
    assert.equal("a", pick(r, { path = "/a//b" }))
  end)

  it("treats a route without path, prefix or regex as prefix \"/\"", function()
    local r = build { { name = "all" } }
    assert.equal("all", pick(r, { path = "/any/thing" }))
  end)

  it("keeps declaration order among routes with the same prefix", function()
    local r = build {
      { name = "first", prefix = "/p/" },
      { name = "second", prefix = "/p/" },
    }
    assert.equal("first", pick(r, { path = "/p/x" }))
  end)

  it("keeps declaration order among routes with the same exact path", function()
    local r = build {
      { name = "first", path = "/p" },
      { name = "second", path = "/p" },
    }
    assert.equal("first", pick(r, { path = "/p" }))
  end)

  it("returns nil when no route matches", function()
    local r = build { { name = "a", prefix = "/a/" } }
    assert.is_nil(r:match { path = "/b" })
  end)

  it("returns nil from an empty table", function()
    assert.is_nil(build({}):match { path = "/" })
  end)
end)

describe("core.router() method filters", function()
  it("matches any method of the list", function()
    local r = build { { name = "rw", methods = { "GET", "POST" } } }
    assert.equal("rw", pick(r, { method = "POST", path = "/" }))
  end)

  it("accepts a single method string", function()
    local r = build { { name = "get", method = "GET" } }
    assert.equal("get", pick(r, { method = "GET", path = "/" }))
  end)

  it("skips a route whose method list does not contain the method", function()
    local r = build { { name = "rw", methods = { "GET", "POST" } } }
    assert.is_nil(pick(r, { method = "DELETE", path = "/" }))
  end)

  it("compares methods case-sensitively", function()
    local r = build { { name = "get", methods = { "GET" } } }
    assert.is_nil(pick(r, { method = "get", path = "/" }))
  end)

  it("goes on to the next route with the same prefix", function()
    local r = build {
      { name = "post", prefix = "/p/", methods = { "POST" } },
      { name = "get", prefix = "/p/", methods = { "GET" } },
    }
    assert.equal("get", pick(r, { method = "GET", path = "/p/x" }))
  end)

  it("goes on to a shorter prefix", function()
    local r = build {
      { name = "long", prefix = "/a/b/", methods = { "POST" } },
      { name = "short", prefix = "/a/" },
    }
    assert.equal("short", pick(r, { method = "GET", path = "/a/b/c" }))
  end)

  it("goes on from an exact path to a regex", function()
    local r = build {
      { name = "exact", path = "/x", methods = { "POST" } },
      { name = "regex", regex = "^/x$" },
    }
    assert.equal("regex", pick(r, { method = "GET", path = "/x" }))
  end)

  it("goes on from a regex to a prefix", function()
    local r = build {
      { name = "regex", regex = "^/x", methods = { "POST" } },
      { name = "prefix", prefix = "/" },
    }
    assert.equal("prefix", pick(r, { method = "GET", path = "/x" }))
  end)
end)

describe("core.router() header filters", function()
  it("matches an exact header value", function()
    local r = build { { name = "beta", headers = { { name = "x-beta", value = "1" } } } }
    assert.equal("beta", pick(r, { path = "/", headers = { { "x-beta", "1" } } }))
  end)

  it("compares the header name case-insensitively", function()
    local r = build { { name = "beta", headers = { { name = "X-Beta", value = "1" } } } }
    assert.equal("beta", pick(r, { path = "/", headers = { { "x-BETA", "1" } } }))
  end)

  it("compares an exact header value case-sensitively", function()
    local r = build { { name = "beta", headers = { { name = "x-beta", value = "on" } } } }
    assert.is_nil(pick(r, { path = "/", headers = { { "x-beta", "ON" } } }))
  end)

  it("skips the route when the header is missing", function()
    local r = build {
      { name = "beta", headers = { { name = "x-beta", value = "1" } } },
      { name = "stable" },
    }
    assert.equal("stable", pick(r, { path = "/" }))
  end)

  it("matches a header against a regex", function()
    local r = build { { name = "mobile", headers = { { name = "user-agent", value = "Android|iPhone", regex = true } } } }
    assert.equal("mobile", pick(r, { path = "/", headers = { { "User-Agent", "Mozilla/5.0 (iPhone)" } } }))
  end)

  it("skips the route when the header regex does not match", function()
    local r = build { { name = "mobile", headers = { { name = "user-agent", value = "^Android", regex = true } } } }
    assert.is_nil(pick(r, { path = "/", headers = { { "user-agent", "curl/8" } } }))
  end)

  it("accepts any one of several fields with the same name", function()
    local r = build { { name = "v2", headers = { { name = "x-v", value = "2" } } } }
    assert.equal("v2", pick(r, { path = "/", headers = { { "x-v", "1" }, { "x-v", "2" } } }))
  end)

  it("requires every header filter to pass", function()
    local r = build {
      { name = "both", headers = { { name = "x-a", value = "1" }, { name = "x-b", value = "1" } } },
    }
    assert.is_nil(pick(r, { path = "/", headers = { { "x-a", "1" } } }))
  end)
end)

describe("core.router() regex routes", function()
  it("reports the capture groups", function()
    local r = build { { name = "user", regex = "^/users/(\\d+)/(\\w+)$" } }
    local m = r:match { path = "/users/42/posts" }
    assert.same({ [0] = "/users/42/posts", "42", "posts" }, m.captures)
  end)

  it("reports an unset optional group as false", function()
    local r = build { { name = "user", regex = "^/u/(\\d+)(?:/(\\w+))?(\\.json)?$" } }
    local m = r:match { path = "/u/1.json" }
    assert.same({ [0] = "/u/1.json", "1", false, ".json" }, m.captures)
  end)

  it("matches the path without the query", function()
    local r = build { { name = "end", regex = "^/a$" } }
    assert.equal("end", pick(r, { path = "/a?b=1" }))
  end)

  it("searches anywhere in the path unless anchored", function()
    local r = build { { name = "json", regex = "\\.json" } }
    assert.equal("json", pick(r, { path = "/data/x.json" }))
  end)

  it("gives up on catastrophic backtracking and goes on", function()
    local r = build {
      { name = "evil", regex = "^/(a+)+$" },
      { name = "all" },
    }
    assert.equal("all", pick(r, { path = "/" .. string.rep("a", 40) .. "b" }))
  end)

  it("reports no captures for a prefix route", function()
    local r = build { { name = "all" } }
    assert.same({}, r:match({ path = "/x" }).captures)
  end)
end)

describe("core.router() results and listing", function()
  it("names a route by its 1-based index by default", function()
    local r = build { { path = "/a" }, { path = "/b" } }
    assert.equal("2", pick(r, { path = "/b" }))
  end)

  it("passes back the index, target, prefix and strip_prefix", function()
    local upstream = { name = "api" }
    local r = build { { prefix = "/v1/", strip_prefix = true, target = upstream } }
    local m = r:match { path = "/v1/x" }
    assert.same({ 1, upstream, "/v1/", true }, { m.index, m.target, m.prefix, m.strip_prefix })
  end)

  it("lists the routes in declaration order", function()
    local r = build {
      { name = "a", host = "API.example.com", prefix = "/v1", src = "cfg.lua:3" },
      { regex = "^/x" },
    }
    local list = r:routes()
    assert.same({ "a", "api.example.com", "/v1", "cfg.lua:3", 1 },
      { list[1].name, list[1].host, list[1].prefix, list[1].src, list[1].index })
    assert.same({ "2", "^/x", 2 }, { list[2].name, list[2].regex, list[2].index })
  end)
end)

describe("core.router() errors", function()
  local function refuse(route)
    local r, err = core.router { route }
    assert.is_nil(r)
    return err
  end

  it("reports a bad regex with src, PCRE2's message and the offset", function()
    assert.equal("cfg.lua:12: bad regex '(': missing closing parenthesis at offset 1",
      refuse { regex = "(", src = "cfg.lua:12" })
  end)

  it("reports a bad header regex with src and the header name", function()
    assert.equal("cfg.lua:4: header 'x-a': bad regex '[': missing terminating ] for character class at offset 1",
      refuse { headers = { { name = "x-a", value = "[", regex = true } }, src = "cfg.lua:4" })
  end)

  it("refuses a prefix that does not start with '/'", function()
    assert.equal("cfg.lua:3: prefix must start with '/'", refuse { prefix = "v1/", src = "cfg.lua:3" })
  end)

  it("refuses a path that does not start with '/'", function()
    assert.equal("cfg.lua:3: path must start with '/'", refuse { path = "x", src = "cfg.lua:3" })
  end)

  it("refuses a route with both path and prefix", function()
    assert.equal("cfg.lua:5: route sets both path and prefix",
      refuse { path = "/a", prefix = "/b", src = "cfg.lua:5" })
  end)

  it("refuses a route with both prefix and regex", function()
    assert.equal("cfg.lua:5: route sets both prefix and regex",
      refuse { prefix = "/b", regex = "^/", src = "cfg.lua:5" })
  end)

  it("refuses a '*' inside a host", function()
    assert.equal("cfg.lua:7: bad host 'api.*.com'", refuse { host = "api.*.com", src = "cfg.lua:7" })
  end)

  it("refuses a '*' not followed by '.'", function()
    assert.equal("cfg.lua:7: bad host '*example.com'", refuse { host = "*example.com", src = "cfg.lua:7" })
  end)

  it("refuses a host with a port", function()
    assert.equal("cfg.lua:7: bad host 'example.com:80'", refuse { host = "example.com:80", src = "cfg.lua:7" })
  end)

  it("names the route by index when it has no src", function()
    local r, err = core.router { { path = "/a" }, { prefix = "x" } }
    assert.same({ nil, "route 2: prefix must start with '/'" }, { r, err })
  end)
end)

describe("core.router() with 1,000 routes", function()
  local r

  lazy_setup(function()
    local routes = {}
    for i = 1, 250 do
      routes[#routes + 1] = { name = "host" .. i, host = "h" .. i .. ".example.com", prefix = "/" }
      routes[#routes + 1] = { name = "wild" .. i, host = "*.w" .. i .. ".example.com", prefix = "/" }
      routes[#routes + 1] = { name = "prefix" .. i, prefix = "/p" .. i }
      routes[#routes + 1] = { name = "exact" .. i, path = "/e/" .. i }
    end
    r = build(routes)
  end)

  it("selects the right route for every one of them", function()
    local wrong = {}
    for i = 1, 250 do
      local cases = {
        ["host" .. i] = { host = "H" .. i .. ".example.com:80", path = "/x" },
        ["wild" .. i] = { host = "a.w" .. i .. ".example.com", path = "/x" },
        ["prefix" .. i] = { path = "/p" .. i .. "/deep/path" },
        ["exact" .. i] = { path = "/e/" .. i },
      }
      for want, q in pairs(cases) do
        local got = pick(r, q)
        if got ~= want then wrong[#wrong + 1] = want .. " -> " .. tostring(got) end
      end
    end
    assert.same({}, wrong)
  end)

  it("lists all of them", function()
    assert.equal(1000, #r:routes())
  end)

  it("finds nothing for a path none of them covers", function()
    assert.is_nil(pick(r, { path = "/p1000" }))
  end)
end)
