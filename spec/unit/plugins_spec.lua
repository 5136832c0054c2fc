-- The bundled plugins (lua/moonproxy/plugins/*.lua), driven through schema,
-- on_request and on_response with the fakes of helpers/fake_req.lua.
local fake = require "helpers.fake_req"
local util = require "moonproxy.plugins.util"

local proxy, restore

local function load(name)
  return fake.plugin(name)
end

-- Runs plugin with conf on a request (and, unless it responded, on a response).
-- Returns the request, the response (or nil) and what on_request returned.
local function run(plugin, conf, reqt, rest)
  local req = fake.request(reqt)
  local ret = plugin.on_request and plugin.on_request(conf, req)
  local res
  if not req.response then
    res = fake.response(rest)
    if plugin.on_response then
      plugin.on_response(conf, req, res)
    end
  end
  return req, res, ret
end

-- The message schema raised for conf; it must carry no position.
local function schema_error(plugin, conf)
  local ok, err = pcall(plugin.schema, conf)
  assert(not ok, "expected the schema to refuse the configuration")
  assert.is_string(err)
  assert(not err:find("^[^ ]*%.lua:%d+:"), "position in: " .. err)
  return err
end

local function refuses(plugin, conf, text)
  local err = schema_error(plugin, conf)
  assert(err:find(text, 1, true), "expected '" .. text .. "' in: " .. err)
end

local function access_control(h)
  local out = {}
  for _, n in ipairs(fake.names(h)) do
    if n:find("^access%-control%-") then
      out[#out + 1] = n
    end
  end
  return out
end

before_each(function()
  proxy = fake.proxy()
  restore = fake.install(proxy)
end)

after_each(function()
  restore()
end)

describe("plugins: every plugin", function()
  for _, name in ipairs({ "headers", "key_auth", "basic_auth", "ip_restriction", "cors", "rate_limit", "request_size" }) do
    it(name .. " has its name, a schema and a hook", function()
      local p = load(name)
      assert.equal(name, p.name)
      assert.is_function(p.schema)
      assert(p.on_request or p.on_response)
    end)

    it(name .. " rejects unknown options without a position", function()
      refuses(load(name), { bogus_option = 1 }, "unknown option 'bogus_option'")
    end)

    it(name .. " rejects a non-table configuration", function()
      refuses(load(name), "yes", "must be a table")
    end)

    it(name .. " rejects positional values", function()
      refuses(load(name), { "extra" }, "unexpected value")
    end)
  end

  it("suggests the option a typo meant", function()
    refuses(load("cors"), { origin = "*" }, "did you mean 'origins'?")
  end)

  it("raises the bare message (the loader adds file:line and the plugin's name)", function()
    assert.equal('needs keys = { "k1", ... } or { k1 = "consumer" }', schema_error(load("key_auth"), {}))
  end)
end)

describe("headers", function()
  local p
  before_each(function() p = load("headers") end)

  it("sets a request header, replacing every value", function()
    local conf = p.schema { request = { set = { ["X-Env"] = "prod" } } }
    local req = run(p, conf, { headers = { ["x-env"] = { "a", "b" } } })
    assert.equal("prod", req.headers["x-env"])
  end)

  it("appends a request header, keeping one existing value", function()
    local conf = p.schema { request = { append = { via = "moonproxy" } } }
    local req = run(p, conf, { headers = { Via = "1.1 edge" } })
    assert.same({ "1.1 edge", "moonproxy" }, fake.list(req.headers, "via"))
  end)

  it("appends to several existing values", function()
    local conf = p.schema { request = { append = { via = "c" } } }
    local req = run(p, conf, { headers = { via = { "a", "b" } } })
    assert.same({ "a", "b", "c" }, fake.list(req.headers, "via"))
  end)

  it("appends a header that is absent by setting it", function()
    local conf = p.schema { request = { append = { via = "c" } } }
    local req = run(p, conf, {})
    assert.equal("c", req.headers.via)
  end)

  it("removes request headers whatever their case", function()
    local conf = p.schema { request = { remove = { "Cookie", "x-debug" } } }
    local req = run(p, conf, { headers = { cookie = "a=1", ["X-Debug"] = "1", keep = "k" } })
    assert.same({ "keep" }, fake.names(req.headers))
  end)

  it("accepts a single name for remove", function()
    local conf = p.schema { request = { remove = "cookie" } }
    local req = run(p, conf, { headers = { cookie = "a=1" } })
    assert.is_nil(req.headers.cookie)
  end)

  it("sets several values from a list", function()
    local conf = p.schema { response = { set = { ["set-cookie"] = { "a=1", "b=2" } } } }
    local _, res = run(p, conf, {}, { headers = { ["set-cookie"] = "old=1" } })
    assert.same({ "a=1", "b=2" }, fake.list(res.headers, "set-cookie"))
  end)

  it("appends several values from a list", function()
    local conf = p.schema { response = { append = { link = { "<a>", "<b>" } } } }
    local _, res = run(p, conf, {}, { headers = { link = "<z>" } })
    assert.same({ "<z>", "<a>", "<b>" }, fake.list(res.headers, "link"))
  end)

  it("takes numbers as text", function()
    local conf = p.schema { response = { set = { ["x-version"] = 3 } } }
    local _, res = run(p, conf)
    assert.equal("3", res.headers["x-version"])
  end)

  it("removes, then sets, then appends", function()
    local conf = p.schema { request = { remove = { "x-a" }, set = { ["x-b"] = "set" }, append = { ["x-a"] = "new", ["x-b"] = "more" } } }
    local req = run(p, conf, { headers = { ["x-a"] = "old", ["x-b"] = "old" } })
    assert.equal("new", req.headers["x-a"])
    assert.same({ "set", "more" }, fake.list(req.headers, "x-b"))
  end)

  it("rewrites response headers: set, append, remove", function()
    local conf = p.schema { response = { set = { ["cache-control"] = "no-store" }, append = { vary = "accept" }, remove = { "server" } } }
    local _, res = run(p, conf, {}, { headers = { server = "origin", vary = "origin", ["cache-control"] = "max-age=60" } })
    assert.equal("no-store", res.headers["cache-control"])
    assert.same({ "origin", "accept" }, fake.list(res.headers, "vary"))
    assert.is_nil(res.headers.server)
  end)

  it("leaves the response alone when only the request side is configured", function()
    local conf = p.schema { request = { set = { ["x-a"] = "1" } } }
    local _, res = run(p, conf, {}, { headers = { ["x-a"] = "origin" } })
    assert.equal("origin", res.headers["x-a"])
  end)

  it("leaves the request alone when only the response side is configured", function()
    local conf = p.schema { response = { set = { ["x-a"] = "1" } } }
    local req = run(p, conf, { headers = { ["x-a"] = "client" } })
    assert.equal("client", req.headers["x-a"])
  end)

  it("accepts an empty value", function()
    local conf = p.schema { request = { set = { ["x-empty"] = "" } } }
    assert.equal("", run(p, conf).headers["x-empty"])
  end)

  it("needs a request or response side", function()
    refuses(p, {}, "needs request")
    refuses(p, { request = {} }, "needs request")
  end)

  it("rejects an unknown option inside a side", function()
    refuses(p, { request = { sett = { a = "1" } } }, "unknown option 'request.sett' (did you mean 'set'?)")
  end)

  it("rejects a side that is not a table", function()
    refuses(p, { response = "x" }, "response must be a table")
  end)

  it("rejects a header name that is not a token", function()
    refuses(p, { request = { set = { ["bad name"] = "1" } } }, "must be a header name")
  end)

  it("rejects headers the proxy manages", function()
    refuses(p, { request = { set = { ["Content-Length"] = "1" } } }, "must not be a header the proxy manages")
    refuses(p, { response = { remove = { "connection" } } }, "must not be a header the proxy manages")
    refuses(p, { response = { append = { ["transfer-encoding"] = "gzip" } } }, "must not be a header the proxy manages")
  end)

  it("rejects a value with CR or LF", function()
    refuses(p, { response = { set = { ["x-a"] = "1\r\nx-b: 2" } } }, "'response.set.x-a' must be a header value")
  end)

  it("rejects a value that is neither a string nor a list", function()
    refuses(p, { request = { append = { ["x-a"] = true } } }, "must be a header value")
    refuses(p, { request = { append = { ["x-a"] = {} } } }, "must be a header value")
  end)

  it("rejects set that is not a table", function()
    refuses(p, { request = { set = "x-a" } }, "'request.set' must be a table of name = value")
  end)

  it("rejects a bad name in remove", function()
    refuses(p, { request = { remove = { "ok", 7 } } }, "'request.remove' [2] must be a header name")
  end)
end)

describe("key_auth", function()
  local p
  before_each(function() p = load("key_auth") end)

  it("lets a known key in the apikey header through and names the consumer", function()
    local conf = p.schema { keys = { ["k-123"] = "billing" } }
    local req, res, ret = run(p, conf, { headers = { apikey = "k-123" } })
    assert.is_nil(ret)
    assert.is_nil(req.response)
    assert.equal("billing", req.ctx.consumer)
    assert.equal(200, res.status)
  end)

  it("names a listed key's consumer by its position", function()
    local conf = p.schema { keys = { "k1", "k2" } }
    local req = run(p, conf, { headers = { apikey = "k2" } })
    assert.equal("key#2", req.ctx.consumer)
  end)

  it("accepts a list and a map together", function()
    local conf = p.schema { keys = { "k1", k2 = "bob" } }
    assert.equal("key#1", run(p, conf, { headers = { apikey = "k1" } }).ctx.consumer)
    assert.equal("bob", run(p, conf, { headers = { apikey = "k2" } }).ctx.consumer)
  end)

  it("answers 401 with a Key challenge when the key is missing", function()
    local conf = p.schema { keys = { "k1" } }
    local req, _, ret = run(p, conf, {})
    assert.equal(fake.RESPONDED, ret)
    assert.equal(401, req.response.status)
    assert.equal('Key realm="moonproxy"', req.response.headers["www-authenticate"])
    assert.equal("missing API key\n", req.response.body)
    assert.is_nil(req.ctx.consumer)
  end)

  it("answers 401 to a wrong key", function()
    local conf = p.schema { keys = { "k1" } }
    local req = run(p, conf, { headers = { apikey = "k2" } })
    assert.equal(401, req.response.status)
    assert.equal("invalid API key\n", req.response.body)
    assert.equal('Key realm="moonproxy"', req.response.headers["www-authenticate"])
  end)

  it("answers 401 to an empty key", function()
    local conf = p.schema { keys = { "k1" } }
    assert.equal(401, run(p, conf, { headers = { apikey = "" } }).response.status)
  end)

  it("answers 401 to a key header sent twice", function()
    local conf = p.schema { keys = { "k1" } }
    assert.equal(401, run(p, conf, { headers = { apikey = { "k1", "k1" } } }).response.status)
  end)

  it("does not take a key prefix or a key with a suffix", function()
    local conf = p.schema { keys = { "secret" } }
    assert.equal(401, run(p, conf, { headers = { apikey = "secre" } }).response.status)
    assert.equal(401, run(p, conf, { headers = { apikey = "secrets" } }).response.status)
  end)

  it("reads the header the header option names", function()
    local conf = p.schema { keys = { "k1" }, header = "X-API-Key" }
    assert.is_nil(run(p, conf, { headers = { ["x-api-key"] = "k1" } }).response)
    assert.equal(401, run(p, conf, { headers = { apikey = "k1" } }).response.status)
  end)

  it("reads the query parameter the query option names", function()
    local conf = p.schema { keys = { "k1" }, query = "api_key" }
    local req = run(p, conf, { query = "a=1&api_key=k1" })
    assert.is_nil(req.response)
    assert.equal("a=1&api_key=k1", req.query)
  end)

  it("decodes the query parameter", function()
    local conf = p.schema { keys = { "a+b/c=" }, query = "key" }
    assert.is_nil(run(p, conf, { query = "key=a%2Bb%2fc%3D" }).response)
    assert.equal(401, run(p, conf, { query = "key=a+b/c=" }).response.status) -- "+" is a space
  end)

  it("prefers the header to the query parameter", function()
    local conf = p.schema { keys = { "k1" }, query = "key" }
    assert.equal(401, run(p, conf, { headers = { apikey = "bad" }, query = "key=k1" }).response.status)
  end)

  it("answers 401 when the query holds no such parameter", function()
    local conf = p.schema { keys = { "k1" }, query = "key" }
    local req = run(p, conf, { query = "keys=k1&xkey=k1" })
    assert.equal("missing API key\n", req.response.body)
  end)

  it("ignores the header when header = false", function()
    local conf = p.schema { keys = { "k1" }, header = false, query = "key" }
    assert.equal(401, run(p, conf, { headers = { apikey = "k1" } }).response.status)
    assert.is_nil(run(p, conf, { query = "key=k1" }).response)
  end)

  it("keeps the key header by default", function()
    local conf = p.schema { keys = { "k1" } }
    assert.equal("k1", run(p, conf, { headers = { apikey = "k1" } }).headers.apikey)
  end)

  it("removes the key header with hide_credentials", function()
    local conf = p.schema { keys = { "k1" }, hide_credentials = true }
    local req = run(p, conf, { headers = { apikey = "k1", other = "x" } })
    assert.is_nil(req.headers.apikey)
    assert.equal("x", req.headers.other)
  end)

  it("removes the query parameter with hide_credentials, keeping the others", function()
    local conf = p.schema { keys = { "k1" }, query = "key", hide_credentials = true }
    local req = run(p, conf, { query = "a=1&key=k1&b=2" })
    assert.equal("a=1&b=2", req.query)
  end)

  it("drops a query left empty by hide_credentials", function()
    local conf = p.schema { keys = { "k1" }, query = "key", hide_credentials = true }
    assert.is_nil(run(p, conf, { query = "key=k1" }).query)
  end)

  it("removes the query parameter with hide_credentials when the header held the key", function()
    local conf = p.schema { keys = { "k1" }, query = "key", hide_credentials = true }
    local req = run(p, conf, { headers = { apikey = "k1" }, query = "key=other&a=1" })
    assert.is_nil(req.response)
    assert.equal("a=1", req.query)
  end)

  it("names the realm option in the challenge", function()
    local conf = p.schema { keys = { "k1" }, realm = "billing api" }
    assert.equal('Key realm="billing api"', run(p, conf).response.headers["www-authenticate"])
  end)

  it("needs keys", function()
    refuses(p, {}, "needs keys")
    refuses(p, { keys = {} }, "'keys' must list keys")
    refuses(p, { keys = "k1" }, "'keys' must list keys")
  end)

  it("rejects keys with spaces, empty keys and non-string consumers", function()
    refuses(p, { keys = { "a b" } }, "without spaces")
    refuses(p, { keys = { "" } }, "without spaces")
    refuses(p, { keys = { k1 = true } }, "consumer names")
  end)

  it("rejects a key listed twice", function()
    refuses(p, { keys = { "k1", k1 = "bob" } }, "lists a key twice")
  end)

  it("rejects a bad header, query, realm or hide_credentials", function()
    refuses(p, { keys = { "k" }, header = "a b" }, "'header' must be a header name")
    refuses(p, { keys = { "k" }, header = false }, "header = false needs query")
    refuses(p, { keys = { "k" }, header = "connection" }, "'header' must not be a header the proxy manages")
    refuses(p, { keys = { "k" }, query = "" }, "'query' must be a non-empty string")
    refuses(p, { keys = { "k" }, realm = 'a"b' }, "'realm' must be a string without quotes")
    refuses(p, { keys = { "k" }, hide_credentials = "yes" }, "'hide_credentials' must be true or false")
  end)

  it("suggests hide_credentials for a typo", function()
    refuses(p, { keys = { "k" }, hide_credential = true }, "did you mean 'hide_credentials'?")
  end)
end)

describe("basic_auth", function()
  local p
  before_each(function() p = load("basic_auth") end)

  local function basic(s)
    local b = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    return ((s:gsub(".", function(x)
      local r, c = "", x:byte()
      for i = 8, 1, -1 do r = r .. (c % 2 ^ i - c % 2 ^ (i - 1) > 0 and "1" or "0") end
      return r
    end) .. "0000"):gsub("%d%d%d?%d?%d?%d?", function(x)
      if #x < 6 then return "" end
      local c = 0
      for i = 1, 6 do c = c + (x:sub(i, i) == "1" and 2 ^ (6 - i) or 0) end
      return b:sub(c + 1, c + 1)
    end) .. ({ "", "==", "=" })[#s % 3 + 1])
  end

  local conf
  before_each(function() conf = p.schema { users = { alice = "secret", bob = "a:b:c", carol = "" } } end)

  it("lets a right user and password through and names the consumer", function()
    local req = run(p, conf, { headers = { authorization = "Basic " .. basic("alice:secret") } })
    assert.is_nil(req.response)
    assert.equal("alice", req.ctx.consumer)
    assert.equal("Basic YWxpY2U6c2VjcmV0", req.headers.authorization)
  end)

  it("splits at the first colon, so passwords may hold colons", function()
    assert.is_nil(run(p, conf, { headers = { authorization = "Basic " .. basic("bob:a:b:c") } }).response)
  end)

  it("accepts an empty password when it is the configured one", function()
    assert.equal("carol", run(p, conf, { headers = { authorization = "Basic " .. basic("carol:") } }).ctx.consumer)
  end)

  it("takes the scheme in any case", function()
    assert.is_nil(run(p, conf, { headers = { authorization = "bAsIc " .. basic("alice:secret") } }).response)
  end)

  it("takes unpadded base64", function()
    assert.is_nil(run(p, conf, { headers = { authorization = "Basic YWxpY2U6c2VjcmV0" } }).response)
    assert.is_nil(run(p, conf, { headers = { authorization = "Basic Ym9iOmE6Yjpj" } }).response)
    assert.is_nil(run(p, conf, { headers = { authorization = "Basic Y2Fyb2w6" } }).response)
  end)

  it("answers 401 with a Basic challenge when Authorization is missing", function()
    local req, _, ret = run(p, conf, {})
    assert.equal(fake.RESPONDED, ret)
    assert.equal(401, req.response.status)
    assert.equal('Basic realm="moonproxy"', req.response.headers["www-authenticate"])
    assert.equal("authentication required\n", req.response.body)
  end)

  it("answers 401 to a wrong password", function()
    local req = run(p, conf, { headers = { authorization = "Basic " .. basic("alice:Secret") } })
    assert.equal(401, req.response.status)
    assert.equal("invalid credentials\n", req.response.body)
    assert.is_nil(req.ctx.consumer)
  end)

  it("answers 401 to an unknown user, whatever the password", function()
    assert.equal(401, run(p, conf, { headers = { authorization = "Basic " .. basic("mallory:secret") } }).response.status)
    assert.equal(401, run(p, conf, { headers = { authorization = "Basic " .. basic("mallory:") } }).response.status)
  end)

  it("answers 401 to another scheme, a missing token or bad base64", function()
    for _, v in ipairs({ "Bearer YWxpY2U6c2VjcmV0", "Basic", "Basic ", "Basic YWxpY2U6c2VjcmV0=", "Basic YWxp*2U6c2VjcmV0",
      "BasicYWxpY2U6c2VjcmV0", "Basic YWxpY2U6 c2VjcmV0" }) do
      local req = run(p, conf, { headers = { authorization = v } })
      assert.equal(401, req.response.status, v)
      assert.equal('Basic realm="moonproxy"', req.response.headers["www-authenticate"], v)
    end
  end)

  it("answers 401 to credentials without a colon", function()
    local req = run(p, conf, { headers = { authorization = "Basic " .. basic("alice") } })
    assert.equal("malformed credentials\n", req.response.body)
  end)

  it("answers 401 to Authorization sent twice", function()
    local v = "Basic " .. basic("alice:secret")
    assert.equal(401, run(p, conf, { headers = { authorization = { v, v } } }).response.status)
  end)

  it("names the realm option in the challenge", function()
    local c = p.schema { users = { a = "b" }, realm = "admin area" }
    assert.equal('Basic realm="admin area"', run(p, c).response.headers["www-authenticate"])
  end)

  it("removes Authorization with hide_credentials", function()
    local c = p.schema { users = { alice = "secret" }, hide_credentials = true }
    local req = run(p, c, { headers = { authorization = "Basic " .. basic("alice:secret") } })
    assert.is_nil(req.response)
    assert.is_nil(req.headers.authorization)
  end)

  it("needs users", function()
    refuses(p, {}, "needs users")
    refuses(p, { users = {} }, "'users' must map user names to passwords")
    refuses(p, { users = { "alice" } }, "must use user names")
  end)

  it("rejects a user name with a colon and a password that is not a string", function()
    refuses(p, { users = { ["a:b"] = "x" } }, "must use user names without \":\"")
    refuses(p, { users = { alice = 1234 } }, "must map 'alice' to a password")
  end)

  it("rejects a realm with a quote", function()
    refuses(p, { users = { a = "b" }, realm = 'say "hi"' }, "'realm' must be a string without quotes")
  end)
end)

describe("util.b64decode()", function()
  local d = util.b64decode

  it("decodes padded input", function()
    assert.equal("f", d("Zg=="))
    assert.equal("fo", d("Zm8="))
    assert.equal("foo", d("Zm9v"))
    assert.equal("foobar", d("Zm9vYmFy"))
  end)

  it("decodes unpadded input", function()
    assert.equal("f", d("Zg"))
    assert.equal("fo", d("Zm8"))
    assert.equal("foob", d("Zm9vYg"))
  end)

  it("decodes the empty string", function()
    assert.equal("", d(""))
  end)

  it("decodes every byte value", function()
    local all = {}
    for i = 0, 255 do all[#all + 1] = string.char(i) end
    all = table.concat(all)
    local enc = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4vMDEyMzQ1Njc4OTo7PD0+P0BBQkNERUZHSElKS0xN"
      .. "Tk9QUVJTVFVWV1hZWltcXV5fYGFiY2RlZmdoaWprbG1ub3BxcnN0dXZ3eHl6e3x9fn+AgYKDhIWGh4iJiouMjY6PkJGSk5SVlpeYmZqbnJ2e"
      .. "n6ChoqOkpaanqKmqq6ytrq+wsbKztLW2t7i5uru8vb6/wMHCw8TFxsfIycrLzM3Oz9DR0tPU1dbX2Nna29zd3t/g4eLj5OXm5+jp6uvs7e7v"
      .. "8PHy8/T19vf4+fr7/P3+/w=="
    assert.equal(all, d(enc))
  end)

  it("refuses a length that leaves one character over", function()
    assert.is_nil(d("Z"))
    assert.is_nil(d("Zm9vY"))
  end)

  it("refuses padding that does not complete a quantum", function()
    assert.is_nil(d("Zg="))
    assert.is_nil(d("Zm8=="))
    assert.is_nil(d("Z==="))
    assert.is_nil(d("===="))
    assert.is_nil(d("Zm9v===="))
  end)

  it("refuses padding in the middle", function()
    assert.is_nil(d("Zg==Zm8="))
    assert.is_nil(d("Z=g="))
  end)

  it("refuses characters outside the standard alphabet", function()
    assert.is_nil(d("Zm9-"))
    assert.is_nil(d("Zm9_"))
    assert.is_nil(d("Zm9v\n"))
    assert.is_nil(d("Zm 9v"))
    assert.is_nil(d("Zm9\0"))
  end)
end)

describe("ip_restriction", function()
  local p
  before_each(function() p = load("ip_restriction") end)

  local function status(conf, addr)
    local req = run(p, conf, { remote_addr = addr })
    return req.response and req.response.status or 200
  end

  it("allows a listed address and denies its neighbours with 403", function()
    local conf = p.schema { allow = { "127.0.0.1" } }
    assert.equal(200, status(conf, "127.0.0.1"))
    assert.equal(403, status(conf, "127.0.0.2"))
    assert.equal(403, status(conf, "127.0.0.0"))
  end)

  it("answers 403 with a short body", function()
    local conf = p.schema { allow = { "127.0.0.1" } }
    local req, _, ret = run(p, conf, { remote_addr = "10.0.0.1" })
    assert.equal(fake.RESPONDED, ret)
    assert.equal("forbidden\n", req.response.body)
  end)

  it("takes /32 as one address", function()
    local conf = p.schema { allow = { "192.0.2.7/32" } }
    assert.equal(200, status(conf, "192.0.2.7"))
    assert.equal(403, status(conf, "192.0.2.6"))
  end)

  it("matches a /8 up to its edges", function()
    local conf = p.schema { allow = { "10.0.0.0/8" } }
    assert.equal(200, status(conf, "10.0.0.0"))
    assert.equal(200, status(conf, "10.255.255.255"))
    assert.equal(403, status(conf, "9.255.255.255"))
    assert.equal(403, status(conf, "11.0.0.0"))
  end)

  it("matches prefixes that end inside a byte", function()
    local conf = p.schema { allow = { "192.168.1.2/31", "172.16.0.0/12" } }
    assert.equal(200, status(conf, "192.168.1.3"))
    assert.equal(403, status(conf, "192.168.1.4"))
    assert.equal(403, status(conf, "192.168.1.1"))
    assert.equal(200, status(conf, "172.31.255.255"))
    assert.equal(403, status(conf, "172.32.0.0"))
  end)

  it("ignores host bits past the prefix", function()
    local conf = p.schema { allow = { "10.1.2.3/8" } }
    assert.equal(200, status(conf, "10.200.0.1"))
  end)

  it("lets 0.0.0.0/0 match every IPv4 client but no IPv6 one", function()
    local conf = p.schema { allow = { "0.0.0.0/0" } }
    assert.equal(200, status(conf, "0.0.0.0"))
    assert.equal(200, status(conf, "255.255.255.255"))
    assert.equal(403, status(conf, "2001:db8::1"))
  end)

  it("lets ::/0 match every client", function()
    local conf = p.schema { allow = { "::/0" } }
    assert.equal(200, status(conf, "2001:db8::1"))
    assert.equal(200, status(conf, "8.8.8.8"))
  end)

  it("matches an IPv6 /64", function()
    local conf = p.schema { allow = { "2001:db8:1:2::/64" } }
    assert.equal(200, status(conf, "2001:db8:1:2::1"))
    assert.equal(200, status(conf, "2001:DB8:1:2:ffff:ffff:ffff:ffff"))
    assert.equal(403, status(conf, "2001:db8:1:3::"))
    assert.equal(403, status(conf, "2001:db8:1:1:ffff:ffff:ffff:ffff"))
  end)

  it("matches a single IPv6 address (/128) in any spelling", function()
    local conf = p.schema { allow = { "::1", "2001:db8::a/128" } }
    assert.equal(200, status(conf, "0:0:0:0:0:0:0:1"))
    assert.equal(200, status(conf, "2001:0db8:0000::000a"))
    assert.equal(403, status(conf, "::2"))
  end)

  it("matches IPv4-mapped clients against IPv4 rules", function()
    local conf = p.schema { allow = { "10.0.0.0/8" } }
    assert.equal(200, status(conf, "::ffff:10.1.2.3"))
    assert.equal(200, status(conf, "::ffff:a01:203"))
    assert.equal(403, status(conf, "::ffff:11.1.2.3"))
    assert.equal(403, status(conf, "::10.1.2.3"))
  end)

  it("matches IPv4 clients against an IPv4-mapped rule", function()
    local conf = p.schema { allow = { "::ffff:0:0/96" } }
    assert.equal(200, status(conf, "203.0.113.9"))
    assert.equal(403, status(conf, "2001:db8::1"))
  end)

  it("denies what deny lists and lets the rest through", function()
    local conf = p.schema { deny = { "203.0.113.0/24", "2001:db8::/32" } }
    assert.equal(403, status(conf, "203.0.113.200"))
    assert.equal(403, status(conf, "2001:db8:ffff::1"))
    assert.equal(200, status(conf, "203.0.114.1"))
    assert.equal(200, status(conf, "2001:db9::1"))
  end)

  it("lets deny win over allow", function()
    local conf = p.schema { allow = { "10.0.0.0/8" }, deny = { "10.6.6.0/24" } }
    assert.equal(200, status(conf, "10.6.7.1"))
    assert.equal(403, status(conf, "10.6.6.1"))
    assert.equal(403, status(conf, "192.0.2.1"))
  end)

  it("gives the same verdict from its cache", function()
    local conf = p.schema { allow = { "10.0.0.0/8" } }
    for _ = 1, 3 do
      assert.equal(200, status(conf, "10.0.0.1"))
      assert.equal(403, status(conf, "11.0.0.1"))
    end
  end)

  it("stays right after its cache fills up", function()
    local conf = p.schema { allow = { "10.0.0.0/8" } }
    for i = 0, 5000 do
      local a = string.format("10.%d.%d.1", math.floor(i / 256), i % 256)
      assert.equal(200, status(conf, a), a)
    end
    assert.equal(403, status(conf, "11.0.0.1"))
  end)

  it("tolerates brackets and a zone in the client address", function()
    local conf = p.schema { allow = { "fe80::/10" } }
    assert.equal(200, status(conf, "fe80::1%eth0"))
    assert.equal(200, status(conf, "[fe80::1]"))
  end)

  it("denies a client address that is not an IP when allow is given", function()
    local conf = p.schema { allow = { "0.0.0.0/0", "::/0" } }
    assert.equal(403, status(conf, "unix:/run/mp.sock"))
    assert.equal(403, status(conf, false))
  end)

  it("lets a client address that is not an IP through a deny-only list", function()
    local conf = p.schema { deny = { "::/0" } }
    assert.equal(200, status(conf, "unix:/run/mp.sock"))
  end)

  it("accepts a single string for allow", function()
    assert.equal(200, status(p.schema { allow = "127.0.0.1" }, "127.0.0.1"))
  end)

  it("needs allow or deny", function()
    refuses(p, {}, "needs allow")
  end)

  it("rejects bad CIDRs at load", function()
    for _, c in ipairs({ "10.0.0.0/33", "::/129", "300.1.1.1", "10.0.0/8", "10.0.0.0/8/8", "1:::2", "", "10.0.0.0/",
      "10.0.0.0/-1", "fe80::1%eth0", "1:2:3:4:5:6:7:8:9", "010.0.0.1", "example.com", "::ffff:1.2.3.4.5", 10, true }) do
      refuses(p, { allow = { "127.0.0.1", c } }, "'allow[2]' must be an address or CIDR")
    end
  end)

  it("rejects allow and deny that are not lists", function()
    refuses(p, { deny = 10 }, "'deny' must be a list of addresses or CIDRs")
    refuses(p, { allow = { a = "10.0.0.0/8" } }, "'allow' must be a list of addresses or CIDRs")
  end)
end)

describe("util.parse_ip()", function()
  local function hex(s)
    return s and (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
  end

  it("maps IPv4 into ::ffff:0:0/96", function()
    local a, is4 = util.parse_ip("1.2.3.4")
    assert.equal("00000000000000000000ffff01020304", hex(a))
    assert.is_true(is4)
  end)

  it("expands :: anywhere", function()
    assert.equal("00000000000000000000000000000000", hex(util.parse_ip("::")))
    assert.equal("00010000000000000000000000000000", hex(util.parse_ip("1::")))
    assert.equal("00010000000000000000000000000002", hex(util.parse_ip("1::2")))
    assert.equal("00010002000300040005000600070000", hex(util.parse_ip("1:2:3:4:5:6:7::")))
  end)

  it("reads an IPv4 tail", function()
    assert.equal("00010002000300040005000601020304", hex(util.parse_ip("1:2:3:4:5:6:1.2.3.4")))
    assert.equal("00000000000000000000000001020304", hex(util.parse_ip("::1.2.3.4")))
  end)

  it("refuses malformed addresses", function()
    for _, s in ipairs({ "1:2:3:4:5:6:7", "1::2::3", ":1::", "1::2:", "12345::", "g::", "1.2.3", "1.2.3.4.5", "256.0.0.0",
      "1:2:3:4:5:6:7:1.2.3.4", "1.2.3.4::" }) do
      assert.is_nil(util.parse_ip(s), s)
    end
  end)
end)

describe("cors", function()
  local p
  before_each(function() p = load("cors") end)

  local function preflight(conf, origin, extra)
    local h = { origin = origin, ["access-control-request-method"] = "PUT" }
    for k, v in pairs(extra or {}) do h[k] = v end
    return run(p, conf, { method = "OPTIONS", headers = h })
  end

  it("answers a preflight from an allowed origin with 204 and the CORS headers", function()
    local conf = p.schema { origins = { "https://a.example" } }
    local req, res, ret = preflight(conf, "https://a.example", { ["access-control-request-headers"] = "x-a, content-type" })
    assert.equal(fake.RESPONDED, ret)
    assert.is_nil(res)
    local h = req.response.headers
    assert.equal(204, req.response.status)
    assert.equal("https://a.example", h["access-control-allow-origin"])
    assert.equal("GET, HEAD, PUT, PATCH, POST, DELETE", h["access-control-allow-methods"])
    assert.equal("x-a, content-type", h["access-control-allow-headers"])
    assert.equal("Origin, Access-Control-Request-Method, Access-Control-Request-Headers", h["vary"])
    assert.is_nil(h["access-control-allow-credentials"])
    assert.is_nil(h["access-control-max-age"])
  end)

  it("names methods, headers, credentials and max_age in a preflight answer", function()
    local conf = p.schema { origins = { "https://a.example" }, methods = { "get", "POST" }, headers = { "Content-Type", "X-A" },
      credentials = true, max_age = 600 }
    local h = preflight(conf, "https://a.example", { ["access-control-request-headers"] = "x-other" }).response.headers
    assert.equal("GET, POST", h["access-control-allow-methods"])
    assert.equal("content-type, x-a", h["access-control-allow-headers"])
    assert.equal("true", h["access-control-allow-credentials"])
    assert.equal("600", h["access-control-max-age"])
  end)

  it("answers a preflight without requested headers without Allow-Headers", function()
    local conf = p.schema { origins = "*" }
    local h = preflight(conf, "https://any.example").response.headers
    assert.equal("*", h["access-control-allow-origin"])
    assert.is_nil(h["access-control-allow-headers"])
  end)

  it("lets a preflight from another origin through without CORS headers", function()
    local conf = p.schema { origins = { "https://a.example" } }
    local req, res, ret = preflight(conf, "https://evil.example")
    assert.is_nil(ret)
    assert.is_nil(req.response)
    assert.same({}, access_control(res.headers))
    assert.equal("Origin", res.headers.vary)
  end)

  it("lets an OPTIONS request without Access-Control-Request-Method through", function()
    local conf = p.schema { origins = "*" }
    local req, res = run(p, conf, { method = "OPTIONS", headers = { origin = "https://a.example" } })
    assert.is_nil(req.response)
    assert.equal("*", res.headers["access-control-allow-origin"])
  end)

  it("adds Allow-Origin and Vary: Origin to a response for an allowed origin", function()
    local conf = p.schema { origins = { "https://a.example", "https://b.example:8443" } }
    local _, res = run(p, conf, { headers = { origin = "https://b.example:8443" } })
    assert.equal("https://b.example:8443", res.headers["access-control-allow-origin"])
    assert.equal("Origin", res.headers.vary)
    assert.same({ "access-control-allow-origin" }, access_control(res.headers))
  end)

  it("adds no CORS headers to a response for another origin", function()
    local conf = p.schema { origins = { "https://a.example" }, credentials = true, expose_headers = { "x-a" } }
    local req, res = run(p, conf, { headers = { origin = "https://a.example.evil" } })
    assert.is_nil(req.response)
    assert.same({}, access_control(res.headers))
  end)

  it("adds Vary: Origin even without an Origin, so caches keep the answers apart", function()
    local conf = p.schema { origins = { "https://a.example" } }
    local _, res = run(p, conf, {})
    assert.equal("Origin", res.headers.vary)
    assert.same({}, access_control(res.headers))
  end)

  it("adds Origin to an existing Vary once", function()
    local conf = p.schema { origins = { "https://a.example" } }
    local _, res = run(p, conf, {}, { headers = { vary = "Accept-Encoding" } })
    assert.same({ "Accept-Encoding", "Origin" }, fake.list(res.headers, "vary"))
    _, res = run(p, conf, {}, { headers = { vary = "accept-encoding, origin" } })
    assert.same({ "accept-encoding, origin" }, fake.list(res.headers, "vary"))
    _, res = run(p, conf, {}, { headers = { vary = "*" } })
    assert.same({ "*" }, fake.list(res.headers, "vary"))
  end)

  it("sends * to any origin and no Vary when origins is *", function()
    local conf = p.schema { origins = "*" }
    local _, res = run(p, conf, { headers = { origin = "https://whatever.example" } })
    assert.equal("*", res.headers["access-control-allow-origin"])
    assert.is_nil(res.headers.vary)
  end)

  it("echoes the origin when origins is * with credentials", function()
    local conf = p.schema { origins = "*", credentials = true }
    local _, res = run(p, conf, { headers = { origin = "https://c.example" } })
    assert.equal("https://c.example", res.headers["access-control-allow-origin"])
    assert.equal("true", res.headers["access-control-allow-credentials"])
    assert.equal("Origin", res.headers.vary)
  end)

  it("adds Expose-Headers and Allow-Credentials to a response", function()
    local conf = p.schema { origins = { "https://a.example" }, expose_headers = { "X-Request-Id", "x-b" }, credentials = true }
    local _, res = run(p, conf, { headers = { origin = "https://a.example" } })
    assert.equal("x-request-id, x-b", res.headers["access-control-expose-headers"])
    assert.equal("true", res.headers["access-control-allow-credentials"])
  end)

  it("compares origins without case and without a trailing slash in the configuration", function()
    local conf = p.schema { origins = { "HTTPS://A.Example/" } }
    local _, res = run(p, conf, { headers = { origin = "https://a.example" } })
    assert.equal("https://a.example", res.headers["access-control-allow-origin"])
  end)

  it("accepts a single origin string and the null origin", function()
    local conf = p.schema { origins = "https://a.example" }
    assert.equal("https://a.example", select(2, run(p, conf, { headers = { origin = "https://a.example" } })).headers["access-control-allow-origin"])
    conf = p.schema { origins = { "null" } }
    assert.equal("null", select(2, run(p, conf, { headers = { origin = "null" } })).headers["access-control-allow-origin"])
  end)

  it("ignores a repeated Origin", function()
    local conf = p.schema { origins = "*" }
    local _, res = run(p, conf, { headers = { origin = { "https://a.example", "https://b.example" } } })
    assert.same({}, access_control(res.headers))
  end)

  it("needs origins", function()
    refuses(p, {}, "needs origins")
  end)

  it("rejects origins with a path, without a scheme, or empty", function()
    refuses(p, { origins = { "https://a.example/app" } }, "'origins' must hold origins: scheme://host[:port]")
    refuses(p, { origins = { "a.example" } }, "'origins' must hold origins: scheme://host[:port]")
    refuses(p, { origins = {} }, "must be \"*\" or a list of origins")
  end)

  it("rejects bad methods, header names, credentials and max_age", function()
    refuses(p, { origins = "*", methods = { "GET POST" } }, "'methods' must be")
    refuses(p, { origins = "*", headers = { "x a" } }, "'headers' [1] must be a header name")
    refuses(p, { origins = "*", expose_headers = 5 }, "'expose_headers' must be a list")
    refuses(p, { origins = "*", credentials = 1 }, "'credentials' must be true or false")
    refuses(p, { origins = "*", max_age = -1 }, "'max_age' must be an integer")
    refuses(p, { origins = "*", max_age = 1.5 }, "'max_age' must be an integer")
  end)
end)

describe("rate_limit", function()
  local p
  before_each(function() p = load("rate_limit") end)

  local function hit(conf, reqt)
    return run(p, conf, reqt or { remote_addr = "192.0.2.1" })
  end

  it("allows the burst, then answers 429 with Retry-After and RateLimit headers", function()
    local conf = p.schema { rate = 1, burst = 3 }
    for _ = 1, 3 do
      assert.is_nil(hit(conf).response)
    end
    local req, _, ret = hit(conf)
    assert.equal(fake.RESPONDED, ret)
    local r = req.response
    assert.equal(429, r.status)
    assert.equal("1", r.headers["retry-after"])
    assert.equal("3", r.headers["ratelimit-limit"])
    assert.equal("0", r.headers["ratelimit-remaining"])
    assert.equal("1", r.headers["ratelimit-reset"])
    assert.equal("too many requests\n", r.body)
  end)

  it("recovers as time passes", function()
    local conf = p.schema { rate = 2, burst = 2 }
    hit(conf); hit(conf)
    assert.equal(429, hit(conf).response.status)
    proxy.advance(0.5)
    assert.is_nil(hit(conf).response)
    assert.equal(429, hit(conf).response.status)
    proxy.advance(10)
    assert.is_nil(hit(conf).response)
    assert.is_nil(hit(conf).response)
    assert.equal(429, hit(conf).response.status)
  end)

  it("rounds Retry-After up to whole seconds, at least 1", function()
    local conf = p.schema { rate = 100, burst = 1 }
    hit(conf)
    assert.equal("1", hit(conf).response.headers["retry-after"])
    conf = p.schema { rate = 0.4, burst = 1, scope = "slow" }
    hit(conf)
    proxy.advance(0.1)
    assert.equal("3", hit(conf).response.headers["retry-after"]) -- 2.25 s left
  end)

  it("takes a fractional rate with a burst of 1 by default", function()
    local conf = p.schema { rate = 0.5 }
    assert.is_nil(hit(conf).response)
    local r = hit(conf).response
    assert.equal("2", r.headers["retry-after"])
    assert.equal("1", r.headers["ratelimit-limit"])
    proxy.advance(2)
    assert.is_nil(hit(conf).response)
  end)

  it("defaults burst to the rate", function()
    local conf = p.schema { rate = 5 }
    for _ = 1, 5 do assert.is_nil(hit(conf).response) end
    assert.equal(429, hit(conf).response.status)
  end)

  it("puts RateLimit headers on allowed responses", function()
    local conf = p.schema { rate = 1, burst = 3 }
    local _, res = hit(conf)
    assert.equal("3", res.headers["ratelimit-limit"])
    assert.equal("2", res.headers["ratelimit-remaining"])
    assert.equal("1", res.headers["ratelimit-reset"])
    _, res = hit(conf)
    assert.equal("1", res.headers["ratelimit-remaining"])
    assert.equal("2", res.headers["ratelimit-reset"])
  end)

  it("counts clients apart by remote_addr", function()
    local conf = p.schema { rate = 1, burst = 1 }
    assert.is_nil(hit(conf, { remote_addr = "192.0.2.1" }).response)
    assert.is_nil(hit(conf, { remote_addr = "192.0.2.2" }).response)
    assert.equal(429, hit(conf, { remote_addr = "192.0.2.1" }).response.status)
  end)

  it("keys on a header with header:NAME", function()
    local conf = p.schema { rate = 1, burst = 1, key = "header:X-Api-Key" }
    assert.is_nil(hit(conf, { headers = { ["x-api-key"] = "a" } }).response)
    assert.is_nil(hit(conf, { headers = { ["x-api-key"] = "b" } }).response)
    assert.equal(429, hit(conf, { headers = { ["X-API-KEY"] = "a" } }).response.status)
  end)

  it("lets requests without the key header through uncounted", function()
    local conf = p.schema { rate = 1, burst = 1, key = "header:x-api-key" }
    for _ = 1, 5 do
      local req, res = hit(conf, {})
      assert.is_nil(req.response)
      assert.is_nil(res.headers["ratelimit-limit"])
    end
    assert.equal(0, proxy.dicts.rate_limit.takes)
  end)

  it("keys on what a key function returns, and skips nil", function()
    local conf = p.schema { rate = 1, burst = 1, key = function(req) return req.path ~= "/free" and req.path or nil end }
    assert.is_nil(hit(conf, { path = "/a" }).response)
    assert.equal(429, hit(conf, { path = "/a" }).response.status)
    assert.is_nil(hit(conf, { path = "/b" }).response)
    assert.is_nil(hit(conf, { path = "/free" }).response)
    assert.is_nil(hit(conf, { path = "/free" }).response)
  end)

  it("shares buckets between instances with the same settings", function()
    local a, b = p.schema { rate = 1, burst = 1 }, p.schema { rate = 1, burst = 1 }
    hit(a)
    assert.equal(429, hit(b).response.status)
  end)

  it("keeps buckets apart for different settings or scopes", function()
    local a, b = p.schema { rate = 1, burst = 1 }, p.schema { rate = 2, burst = 1 }
    local c = p.schema { rate = 1, burst = 1, scope = "admin" }
    hit(a)
    assert.is_nil(hit(b).response)
    assert.is_nil(hit(c).response)
  end)

  it("opens its dictionary at load with dict and dict_size", function()
    p.schema { rate = 1 }
    p.schema { rate = 1, dict = "limits", dict_size = "1m" }
    assert.same({ { name = "rate_limit", size = "10m" }, { name = "limits", size = 1048576 } }, proxy.shared_calls)
  end)

  it("shows the instance with the fewest requests left when several apply", function()
    local global, route = p.schema { rate = 10, burst = 10 }, p.schema { rate = 1, burst = 2, scope = "route" }
    local req = fake.request { remote_addr = "192.0.2.1" }
    p.on_request(global, req)
    p.on_request(route, req)
    local res = fake.response()
    p.on_response(global, req, res)
    p.on_response(route, req, res)
    assert.equal("2", res.headers["ratelimit-limit"])
    assert.equal("1", res.headers["ratelimit-remaining"])
  end)

  it("needs a positive rate", function()
    refuses(p, {}, "needs rate")
    refuses(p, { rate = 0 }, "'rate' must be a number of requests per second greater than 0")
    refuses(p, { rate = -1 }, "'rate' must be")
    refuses(p, { rate = "10" }, "'rate' must be")
    refuses(p, { rate = 0 / 0 }, "'rate' must be")
  end)

  it("rejects a burst that is not a whole number >= 1", function()
    refuses(p, { rate = 1, burst = 0 }, "'burst' must be an integer >= 1")
    refuses(p, { rate = 1, burst = 1.5 }, "'burst' must be an integer >= 1")
  end)

  it("rejects other keys", function()
    refuses(p, { rate = 1, key = "cookie:sid" }, "'key' must be \"remote_addr\", \"header:NAME\" or a function")
    refuses(p, { rate = 1, key = "header:" }, "'key' must be")
    refuses(p, { rate = 1, key = "header:a b" }, "'key' must be")
  end)

  it("lets the request through when the dictionary cannot hold the bucket", function()
    local conf = p.schema { rate = 1, burst = 1 }
    proxy.dicts.rate_limit.take = function() return nil, "too large" end
    for _ = 1, 3 do
      local req, res = hit(conf)
      assert.is_nil(req.response)
      assert.is_nil(res.headers["ratelimit-limit"])
    end
  end)

  it("rejects a bad dict or dict_size", function()
    refuses(p, { rate = 1, dict = "" }, "'dict' must be a non-empty string")
    refuses(p, { rate = 1, dict_size = "10x" }, "'dict_size' must be a size")
  end)
end)

describe("request_size", function()
  local p
  before_each(function() p = load("request_size") end)

  local function status(conf, headers)
    local req = run(p, conf, { method = "POST", headers = headers })
    return req.response and req.response.status or 200
  end

  it("lets a body up to max through and answers 413 beyond", function()
    local conf = p.schema { max = 100 }
    assert.equal(200, status(conf, { ["content-length"] = "100" }))
    assert.equal(413, status(conf, { ["content-length"] = "101" }))
  end)

  it("answers 413 with a short body", function()
    local conf = p.schema { max = 1 }
    local req, _, ret = run(p, conf, { headers = { ["content-length"] = "2" } })
    assert.equal(fake.RESPONDED, ret)
    assert.equal("request body too large\n", req.response.body)
  end)

  it("reads sizes like 1m", function()
    local conf = p.schema { max = "1m" }
    assert.equal(200, status(conf, { ["content-length"] = "1048576" }))
    assert.equal(413, status(conf, { ["content-length"] = "1048577" }))
  end)

  it("lets a request without Content-Length (chunked) through", function()
    local conf = p.schema { max = 1 }
    assert.equal(200, status(conf, { ["transfer-encoding"] = "chunked" }))
    assert.equal(200, status(conf, {}))
  end)

  it("answers 413 when any of repeated Content-Length values is over", function()
    local conf = p.schema { max = 10 }
    assert.equal(413, status(conf, { ["content-length"] = { "5", "50" } }))
  end)

  it("takes max = 0 as no body at all", function()
    local conf = p.schema { max = 0 }
    assert.equal(200, status(conf, { ["content-length"] = "0" }))
    assert.equal(413, status(conf, { ["content-length"] = "1" }))
  end)

  it("needs a size for max", function()
    refuses(p, {}, "needs max")
    refuses(p, { max = "1x" }, "'max' must be a size")
    refuses(p, { max = -1 }, "'max' must be a size")
    refuses(p, { max = 1.5 }, "'max' must be a size")
  end)

  it("suggests max for a typo", function()
    refuses(p, { maxx = 1 }, "did you mean 'max'?")
  end)
end)
