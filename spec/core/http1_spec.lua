-- core.parse_request(), parse_response(), chunked_decode(): the C HTTP/1
-- parser (src/http1.c) against SPEC "Behaviour on the wire" and RFC 9112.
-- Inputs end at a PROT_NONE page, so a read past the end crashes the spec.
local core = require "moonproxy.core"

-- A head from its lines: each ends with CRLF, then the empty line.
local function head(...)
  return table.concat({ ... }, "\r\n") .. "\r\n\r\n"
end

-- The request parsed from s; fails the test when it is refused or incomplete.
local function parsed(s, limits)
  local r, status, err = core.parse_request(s, limits)
  assert(r, "refused: " .. tostring(status) .. " " .. tostring(err))
  return r
end

-- The status and error of a refused request head.
local function refused(s, limits)
  local r, status, err = core.parse_request(s, limits)
  assert(r == nil, "accepted: " .. tostring(r))
  return status, err
end

-- s as two pieces cut after byte i.
local function cut(s, i)
  return { s:sub(1, i), s:sub(i + 1) }
end

-- s as a list of one-byte pieces.
local function bytes(s)
  local t = {}
  for i = 1, #s do
    t[i] = s:sub(i, i)
  end
  return t
end

-- Drops the second result (the number of calls) of a parse.
local function first(r)
  return r
end

local GET = head("GET /index.html?q=1&r=2 HTTP/1.1", "Host: example.com", "User-Agent: spec/1.0",
  "Accept: */*", "Connection: keep-alive")

describe("parse_request() request line", function()
  it("parses method, target, path, query and version", function()
    local r = parsed(GET)
    assert.same({ "GET", "/index.html?q=1&r=2", "/index.html", "q=1&r=2", true, 1 },
      { r.method, r.target, r.path, r.query, r.has_query, r.minor })
  end)

  it("reports the head length and the fields in order", function()
    local r = parsed(GET .. "body")
    assert.equal(#GET, r.head_len)
    assert.same({ "Host", "example.com" }, r.headers[1])
    assert.same({ "Connection", "keep-alive" }, r.headers[4])
  end)

  it("returns false while the head is incomplete", function()
    assert.is_false(core.parse_request("GET / HTTP/1.1\r\nHost: a\r\n"))
  end)

  it("splits path and query at the first '?' only", function()
    local r = parsed(head("GET /a?b?c HTTP/1.1", "Host: a"))
    assert.same({ "/a", "b?c" }, { r.path, r.query })
  end)

  it("tells an empty query from none", function()
    local with, without = parsed(head("GET /a? HTTP/1.1", "Host: a")), parsed(head("GET /a HTTP/1.1", "Host: a"))
    assert.same({ true, "", false, "" }, { with.has_query, with.query, without.has_query, without.query })
  end)

  it("takes host and path from an absolute-form target and keeps the Host field", function()
    local r = parsed(head("GET http://example.com:8080/p/q?x=1 HTTP/1.1", "Host: other"))
    assert.same({ "example.com:8080", "/p/q", "x=1" }, { r.host, r.path, r.query })
    assert.same({ "Host", "other" }, r.headers[1])
  end)

  it("uses '/' as the path of an absolute-form target without one", function()
    local r = parsed(head("GET HTTPS://example.com?x HTTP/1.1", "Host: example.com"))
    assert.same({ "example.com", "/", "x" }, { r.host, r.path, r.query })
  end)

  it("accepts the asterisk-form with OPTIONS", function()
    assert.equal("*", parsed(head("OPTIONS * HTTP/1.1", "Host: a")).path)
  end)

  it("refuses the asterisk-form with another method", function()
    assert.equal(400, refused(head("GET * HTTP/1.1", "Host: a")))
  end)

  it("refuses the authority-form", function()
    assert.equal(400, refused(head("GET example.com:443 HTTP/1.1", "Host: a")))
  end)

  it("refuses CONNECT", function()
    assert.equal(400, refused(head("CONNECT example.com:443 HTTP/1.1", "Host: example.com:443")))
  end)

  it("refuses an absolute-form target with userinfo", function()
    assert.equal(400, refused(head("GET http://u@example.com/ HTTP/1.1", "Host: a")))
  end)

  it("refuses an absolute-form target with an empty authority", function()
    assert.equal(400, refused(head("GET http:///p HTTP/1.1", "Host: a")))
  end)

  it("accepts HTTP/1.0 without Host", function()
    local r = parsed(head("GET / HTTP/1.0"))
    assert.same({ 0, "" }, { r.minor, r.host })
  end)

  for _, v in ipairs { "http/1.1", "HTTP/1.10", "HTTP/1", "HTTP/1.1 ", "HTTP/1.x", "HTTP/11.1" } do
    it("refuses the version " .. string.format("%q", v), function()
      assert.equal(400, refused(head("GET / " .. v, "Host: a")))
    end)
  end

  for _, v in ipairs { "HTTP/1.2", "HTTP/1.9" } do
    it("reads the higher minor version " .. v .. " as HTTP/1.1 (RFC 9112 §2.3)", function()
      local r = parsed(head("GET / " .. v, "Host: a"))
      assert.equal(1, r.minor)
    end)
  end

  for _, v in ipairs { "HTTP/2.0", "HTTP/0.9", "HTTP/3.1" } do
    it("answers 505 to the version " .. v, function()
      assert.equal(505, refused(head("GET / " .. v, "Host: a")))
    end)
  end

  for name, line in pairs {
    ["two spaces after the method"] = "GET  / HTTP/1.1",
    ["a tab as separator"] = "GET\t/ HTTP/1.1",
    ["no version"] = "GET /",
    ["no target"] = "GET HTTP/1.1",
    ["an empty method"] = " / HTTP/1.1",
    ["a method with a non-token char"] = "GE(T / HTTP/1.1",
    ["a target with a control byte"] = "GET /a\1b HTTP/1.1",
    ["a target with DEL"] = "GET /a\127b HTTP/1.1",
    ["a target with a byte >= 0x80"] = "GET /caf\195\169 HTTP/1.1",
    ["a target not starting with '/'"] = "GET index.html HTTP/1.1",
    ["a bare CR inside"] = "GET /a\rb HTTP/1.1",
  } do
    it("refuses a request line with " .. name, function()
      assert.equal(400, refused(head(line, "Host: a")))
    end)
  end

  it("refuses a method longer than 32 bytes", function()
    assert.equal(400, refused(head(string.rep("M", 33) .. " / HTTP/1.1", "Host: a")))
  end)

  it("skips empty lines before the request line and counts them in head_len", function()
    local s = "\r\n\n\r\n" .. head("GET / HTTP/1.1", "Host: a")
    local r = parsed(s)
    assert.same({ "GET", #s }, { r.method, r.head_len })
  end)

  it("refuses a bare CR before the request line", function()
    assert.equal(400, refused("\rGET / HTTP/1.1\r\nHost: a\r\n\r\n"))
  end)

  it("accepts bare LF line endings", function()
    local s = "GET /x HTTP/1.1\nHost: a\nX: 1\n\n"
    local r = parsed(s)
    assert.same({ "/x", "a", 2, #s }, { r.path, r.host, #r.headers, r.head_len })
  end)
end)

describe("parse_request() limits", function()
  local small = { max_header_size = 256, max_uri_size = 32 }

  it("accepts a target of exactly max_uri_size bytes", function()
    assert.truthy(parsed(head("GET /" .. string.rep("a", 31) .. " HTTP/1.1", "Host: a"), small))
  end)

  it("answers 414 to a complete head whose target is too long", function()
    assert.equal(414, refused(head("GET /" .. string.rep("a", 32) .. " HTTP/1.1", "Host: a"), small))
  end)

  it("answers 414 before the head is complete", function()
    assert.equal(414, refused("GET /" .. string.rep("a", 40), small))
  end)

  it("answers 414 at the first byte past the limit when the target streams in", function()
    local s = "GET /" .. string.rep("a", 31)
    assert.is_false(core.parse_request(bytes(s), small))
    assert.equal(414, refused(bytes(s .. "a"), small))
  end)

  it("answers 414 rather than 431 when the target fills the head", function()
    assert.equal(414, refused("GET /" .. string.rep("a", 300), small))
  end)

  it("refuses a bad request line early once it is longer than a target may be", function()
    assert.equal(400, refused("GET /" .. string.rep("a", 20) .. " HTTP/1.1xxxxxxxxxxxxxxxx", small))
  end)

  it("answers 431 to a head longer than max_header_size", function()
    local s = head("GET / HTTP/1.1", "Host: a", "X: " .. string.rep("v", 300))
    assert.equal(431, refused(s, small))
  end)

  it("answers 431 to an incomplete head that already exceeds max_header_size", function()
    assert.equal(431, refused("GET / HTTP/1.1\r\nX: " .. string.rep("v", 300), small))
  end)

  it("accepts a head of exactly max_header_size bytes", function()
    local s = head("GET / HTTP/1.1", "Host: a", "X: ")
    s = head("GET / HTTP/1.1", "Host: a", "X: " .. string.rep("v", 256 - #s))
    assert.equal(256, parsed(s, small).head_len)
  end)

  it("answers 431 to a head one byte longer than max_header_size", function()
    local s = head("GET / HTTP/1.1", "Host: a", "X: ")
    s = head("GET / HTTP/1.1", "Host: a", "X: " .. string.rep("v", 257 - #s))
    assert.equal(431, refused(s, small))
  end)

  it("counts leading empty lines against max_header_size", function()
    assert.equal(431, refused(string.rep("\r\n", 200), small))
  end)

  local function fields(n)
    local lines = { "GET / HTTP/1.1", "Host: a" }
    for i = 2, n do
      lines[#lines + 1] = "X-" .. i .. ": v"
    end
    return head(unpack(lines))
  end

  it("accepts 100 fields", function()
    assert.equal(100, #parsed(fields(100)).headers)
  end)

  it("answers 431 to more than 100 fields", function()
    assert.equal(431, refused(fields(101)))
  end)
end)

describe("parse_request() field lines", function()
  it("trims OWS around a value", function()
    assert.same({ "X", "a b" }, parsed(head("GET / HTTP/1.1", "Host: a", "X: \t a b \t")).headers[2])
  end)

  it("accepts an empty value", function()
    assert.same({ "X", "" }, parsed(head("GET / HTTP/1.1", "Host: a", "X:")).headers[2])
  end)

  it("accepts HTAB and obs-text inside a value", function()
    assert.same({ "X", "a\tcaf\233" }, parsed(head("GET / HTTP/1.1", "Host: a", "X: a\tcaf\233")).headers[2])
  end)

  it("refuses obs-fold", function()
    local status, err = refused(head("GET / HTTP/1.1", "Host: a", "X: a", " b"))
    assert.same({ 400, "obs-fold" }, { status, err })
  end)

  it("refuses whitespace before the first field", function()
    assert.equal(400, refused(head("GET / HTTP/1.1", " Host: a")))
  end)

  it("refuses whitespace before the colon", function()
    local status, err = refused(head("GET / HTTP/1.1", "Host : a"))
    assert.same({ 400, "whitespace before colon" }, { status, err })
  end)

  it("refuses a field without a colon", function()
    assert.equal(400, refused(head("GET / HTTP/1.1", "Host: a", "Nonsense")))
  end)

  it("refuses an empty field name", function()
    assert.equal(400, refused(head("GET / HTTP/1.1", "Host: a", ": v")))
  end)

  for name, byte in pairs { NUL = "\0", ["a control byte"] = "\1", DEL = "\127", ["a bare CR"] = "\r" } do
    it("refuses " .. name .. " in a field name", function()
      assert.equal(400, refused(head("GET / HTTP/1.1", "Host: a", "X" .. byte .. "Y: v")))
    end)

    it("refuses " .. name .. " in a field value", function()
      assert.equal(400, refused(head("GET / HTTP/1.1", "Host: a", "X: a" .. byte .. "b")))
    end)
  end

  it("refuses a bare CR at the end of a field line", function()
    assert.equal(400, refused("GET / HTTP/1.1\r\nHost: a\r\nX: v\r\r\n\r\n"))
  end)
end)

describe("parse_request() Host", function()
  it("takes host from the Host field", function()
    assert.equal("example.com:8080", parsed(head("GET / HTTP/1.1", "host: example.com:8080")).host)
  end)

  it("refuses HTTP/1.1 without Host", function()
    local status, err = refused(head("GET / HTTP/1.1", "X: a"))
    assert.same({ 400, "missing Host" }, { status, err })
  end)

  it("refuses an absolute-form HTTP/1.1 request without Host", function()
    assert.equal(400, refused(head("GET http://a/ HTTP/1.1")))
  end)

  it("refuses two Host fields", function()
    assert.equal(400, refused(head("GET / HTTP/1.1", "Host: a", "Host: a")))
  end)

  for _, v in ipairs { "a b", "a/b", "a\\b", "a?b", "a#b", "u@a" } do
    it("refuses the Host value " .. string.format("%q", v), function()
      assert.equal(400, refused(head("GET / HTTP/1.1", "Host: " .. v)))
    end)
  end

  it("accepts an IPv6 literal with a port", function()
    assert.equal("[::1]:80", parsed(head("GET / HTTP/1.1", "Host: [::1]:80")).host)
  end)
end)

describe("parse_request() framing", function()
  local function cl(...)
    local lines = { "POST / HTTP/1.1", "Host: a" }
    for _, v in ipairs { ... } do
      lines[#lines + 1] = "Content-Length: " .. v
    end
    return head(unpack(lines))
  end

  it("reports -1 without Content-Length or Transfer-Encoding", function()
    local r = parsed(head("GET / HTTP/1.1", "Host: a"))
    assert.same({ -1, false }, { r.content_length, r.chunked })
  end)

  it("reads Content-Length", function()
    assert.equal(42, parsed(cl("42")).content_length)
  end)

  it("accepts leading zeros in Content-Length", function()
    assert.equal(7, parsed(cl("007")).content_length)
  end)

  it("accepts several identical Content-Length fields as one", function()
    assert.equal(5, parsed(cl("5", "5")).content_length)
  end)

  it("accepts a list of identical Content-Length values as one", function()
    assert.equal(5, parsed(cl("5, 5,5")).content_length)
  end)

  it("refuses conflicting Content-Length fields", function()
    local status, err = refused(cl("5", "6"))
    assert.same({ 400, "conflicting Content-Length" }, { status, err })
  end)

  it("refuses a list of differing Content-Length values", function()
    assert.equal(400, refused(cl("5, 6")))
  end)

  for _, v in ipairs { "", "+5", "-1", "5 5", "5a", "0x5", "5,", ",5", "1.0", "5,,5" } do
    it("refuses Content-Length " .. string.format("%q", v), function()
      assert.equal(400, refused(cl(v)))
    end)
  end

  it("accepts Content-Length 2^62", function()
    assert.equal(2 ^ 62, parsed(cl("4611686018427387904")).content_length)
  end)

  it("refuses Content-Length above 2^62", function()
    assert.equal(400, refused(cl("4611686018427387905")))
  end)

  it("refuses a Content-Length that overflows 64 bits", function()
    assert.equal(400, refused(cl("99999999999999999999999")))
  end)

  it("reads Transfer-Encoding: chunked", function()
    local r = parsed(head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked"))
    assert.same({ true, -1 }, { r.chunked, r.content_length })
  end)

  it("compares the coding case-insensitively", function()
    assert.is_true(parsed(head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: Chunked")).chunked)
  end)

  it("refuses Content-Length with Transfer-Encoding", function()
    local s = head("POST / HTTP/1.1", "Host: a", "Content-Length: 5", "Transfer-Encoding: chunked")
    assert.equal(400, refused(s))
  end)

  it("refuses Transfer-Encoding with Content-Length whatever the order", function()
    local s = head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked", "Content-Length: 5")
    assert.equal(400, refused(s))
  end)

  it("refuses Transfer-Encoding in HTTP/1.0", function()
    assert.equal(400, refused(head("POST / HTTP/1.0", "Transfer-Encoding: chunked")))
  end)

  it("refuses an empty Transfer-Encoding", function()
    assert.equal(400, refused(head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: ")))
  end)

  -- RFC 9112 §6.3: a final coding other than chunked leaves the length unknown: 400
  for _, v in ipairs { "gzip", "identity", "chunked, gzip", "chunked, chunked", "chunked;x=1" } do
    it("answers 400 to Transfer-Encoding " .. string.format("%q", v), function()
      assert.equal(400, refused(head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: " .. v)))
    end)
  end

  it("answers 400 to a final coding other than chunked over two fields", function()
    local s = head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked", "Transfer-Encoding: gzip")
    assert.equal(400, refused(s))
  end)

  it("answers 400 to chunked listed in two Transfer-Encoding fields", function()
    local s = head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked", "Transfer-Encoding: chunked")
    assert.equal(400, refused(s))
  end)

  -- RFC 9112 §6.1: a coding the proxy does not implement, then chunked: 501
  it("answers 501 to Transfer-Encoding \"gzip, chunked\"", function()
    assert.equal(501, refused(head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: gzip, chunked")))
  end)
end)

describe("parse_request() connection fields", function()
  it("reads Connection: close", function()
    local r = parsed(head("GET / HTTP/1.1", "Host: a", "Connection: close"))
    assert.same({ true, false }, { r.conn_close, r.conn_keepalive })
  end)

  it("reads keep-alive from a Connection list, case-insensitively", function()
    local r = parsed(head("GET / HTTP/1.0", "Connection: Upgrade, Keep-Alive"))
    assert.same({ false, true }, { r.conn_close, r.conn_keepalive })
  end)

  it("reads Expect: 100-continue case-insensitively", function()
    assert.is_true(parsed(head("POST / HTTP/1.1", "Host: a", "Expect: 100-Continue")).expect_continue)
  end)

  it("ignores another expectation", function()
    assert.is_false(parsed(head("POST / HTTP/1.1", "Host: a", "Expect: something")).expect_continue)
  end)

  it("ignores Expect: 100-continue in HTTP/1.0", function()
    assert.is_false(parsed(head("POST / HTTP/1.0", "Expect: 100-continue")).expect_continue)
  end)

  it("notes an Upgrade field", function()
    assert.is_true(parsed(head("GET / HTTP/1.1", "Host: a", "Upgrade: websocket")).upgrade)
  end)
end)

describe("parse_request() incremental parsing", function()
  it("parses pipelined heads one after the other from head_len", function()
    local second = head("GET /two HTTP/1.1", "Host: b")
    local r1 = parsed(GET .. second)
    local r2 = parsed((GET .. second):sub(r1.head_len + 1))
    assert.same({ "/index.html", "/two", #second }, { r1.path, r2.path, r2.head_len })
  end)

  it("gives the same result at every split in two pieces", function()
    local whole = first(parsed(GET))
    for i = 1, #GET - 1 do
      assert.same(whole, first(parsed(cut(GET, i))), "split after byte " .. i)
    end
  end)

  it("gives the same result byte by byte", function()
    local r, calls = core.parse_request(bytes(GET))
    assert.same(parsed(GET), r)
    assert.equal(#GET, calls)
  end)

  it("gives the same result byte by byte with leading empty lines and bare LFs", function()
    local s = "\r\n\n" .. "GET /a HTTP/1.1\nHost: a\r\nX: y\n\r\n"
    assert.same(parsed(s), first(core.parse_request(bytes(s))))
  end)

  it("gives the same refusal at every split", function()
    local small = { max_header_size = 256, max_uri_size = 32 }
    local s = head("GET /" .. string.rep("a", 40) .. " HTTP/1.1", "Host: a")
    for i = 1, #s - 1 do
      assert.equal(414, refused(cut(s, i), small), "split after byte " .. i)
    end
  end)

  -- A rescan from the start at each call takes seconds on 1 MB (n^2/2 bytes).
  local big = { max_header_size = 2000000, max_uri_size = 2000000 }

  it("scans a large head byte by byte in linear time", function()
    local pieces = bytes(head("GET / HTTP/1.1", "Host: a", "X: " .. string.rep("v", 1000000)))
    local t0 = os.clock()
    assert.equal(#pieces, core.parse_request(pieces, big).head_len)
    assert.is_true(os.clock() - t0 < 2)
  end)

  it("scans a large target byte by byte in linear time", function()
    local pieces = bytes(head("GET /" .. string.rep("a", 1000000) .. " HTTP/1.1", "Host: a"))
    local t0 = os.clock()
    assert.equal(#pieces, core.parse_request(pieces, big).head_len)
    assert.is_true(os.clock() - t0 < 2)
  end)
end)

describe("parse_response()", function()
  local function response(s, max)
    local r, err = core.parse_response(s, max)
    assert(r, "refused: " .. tostring(err))
    return r
  end

  local function bad(s)
    local r, err = core.parse_response(s)
    assert(r == nil, "accepted")
    return err
  end

  it("parses the status line and fields", function()
    local r = response(head("HTTP/1.1 200 OK", "Content-Length: 12", "Connection: close"))
    assert.same({ 1, 200, "OK", 12, false, true }, { r.minor, r.status, r.reason, r.content_length, r.chunked, r.conn_close })
  end)

  it("keeps spaces inside the reason phrase", function()
    assert.equal("Not Found Here", response(head("HTTP/1.0 404 Not Found Here")).reason)
  end)

  it("accepts an empty reason phrase", function()
    local r = response(head("HTTP/1.1 204 "))
    assert.same({ 204, "" }, { r.status, r.reason })
  end)

  it("accepts a status line without reason phrase", function()
    assert.equal(204, response(head("HTTP/1.1 204")).status)
  end)

  it("returns false while the head is incomplete", function()
    assert.is_false(core.parse_response("HTTP/1.1 200 OK\r\n"))
  end)

  for _, line in ipairs { "HTTP/2.0 200 OK", "HTTP/1.1 20 OK", "HTTP/1.1 099 X", "HTTP/1.1 2000 X",
    "HTTP/1.1  200 OK", "http/1.1 200 OK", "HTTP/1.1 200\tOK", "HTTP/1.1 200 O\1K" } do
    it("refuses the status line " .. string.format("%q", line), function()
      assert.truthy(bad(head(line)))
    end)
  end

  it("does not skip empty lines before the status line", function()
    assert.truthy(bad("\r\n" .. head("HTTP/1.1 200 OK")))
  end)

  it("reads a chunked response", function()
    local r = response(head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked"))
    assert.same({ true, -1 }, { r.chunked, r.content_length })
  end)

  it("refuses Content-Length with Transfer-Encoding", function()
    assert.truthy(bad(head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked", "Content-Length: 3")))
  end)

  it("refuses a Transfer-Encoding other than chunked", function()
    assert.truthy(bad(head("HTTP/1.1 200 OK", "Transfer-Encoding: gzip, chunked")))
  end)

  it("refuses Transfer-Encoding in an HTTP/1.0 response", function()
    assert.truthy(bad(head("HTTP/1.0 200 OK", "Transfer-Encoding: chunked")))
  end)

  it("refuses conflicting Content-Length fields", function()
    assert.equal("conflicting Content-Length", bad(head("HTTP/1.1 200 OK", "Content-Length: 1", "Content-Length: 2")))
  end)

  it("refuses obs-fold", function()
    assert.equal("obs-fold", bad(head("HTTP/1.1 200 OK", "X: a", "\tb")))
  end)

  it("refuses a head longer than max", function()
    assert.truthy(select(2, core.parse_response("HTTP/1.1 200 OK\r\nX: " .. string.rep("v", 100), 64)))
  end)

  it("reads Connection: keep-alive", function()
    assert.is_true(response(head("HTTP/1.0 200 OK", "Connection: keep-alive")).conn_keepalive)
  end)

  it("gives the same result at every split in two pieces", function()
    local s = head("HTTP/1.1 200 OK", "Content-Type: text/plain", "Transfer-Encoding: chunked")
    local whole = response(s)
    for i = 1, #s - 1 do
      assert.same(whole, response(cut(s, i)), "split after byte " .. i)
    end
  end)
end)

describe("chunked_decode()", function()
  local BODY = "5\r\nhello\r\n1;name=value\r\n \r\nA\r\n0123456789\r\n0\r\n\r\n"

  local function decoded(input)
    local data, done, consumed = core.chunked_decode(input)
    assert(data, done)
    return data, done, consumed
  end

  local function bad(input)
    local data, err = core.chunked_decode(input)
    assert(data == nil, "accepted")
    return err
  end

  it("decodes chunks up to the last chunk", function()
    assert.same({ "hello 0123456789", true, #BODY }, { decoded(BODY) })
  end)

  it("stops exactly at the end of the message", function()
    assert.same({ "hello 0123456789", true, #BODY }, { decoded(BODY .. "GET / HTTP/1.1\r\n") })
  end)

  it("reports an incomplete message as not done", function()
    assert.same({ "hel", false, 6 }, { decoded("5\r\nhel") })
  end)

  it("accepts upper-case hex and leading zeros", function()
    assert.equal(string.rep("x", 26), (decoded("001A\r\n" .. string.rep("x", 26) .. "\r\n0\r\n\r\n")))
  end)

  it("skips chunk extensions, quoted values included", function()
    assert.equal("abc", (decoded('3;a=1;b="x;y"\r\nabc\r\n0;last\r\n\r\n')))
  end)

  it("accepts whitespace before a chunk extension", function()
    assert.equal("abc", (decoded("3 \t;a=1\r\nabc\r\n0\r\n\r\n")))
  end)

  it("consumes trailer fields", function()
    local s = "3\r\nabc\r\n0\r\nX-Sum: 1\r\nX-Other: 2\r\n\r\n"
    assert.same({ "abc", true, #s }, { decoded(s .. "next") })
  end)

  it("reports trailer fields as field lines, OWS trimmed", function()
    local _, err, _, trailers = core.chunked_decode("0\r\nX-Sum:  1 \r\nX-Empty:\r\nX-Other:\t2\r\n\r\n")
    assert.is_true(err)
    assert.same({ { "X-Sum", "1" }, { "X-Empty", "" }, { "X-Other", "2" } }, trailers)
  end)

  it("reports the same trailer fields byte by byte", function()
    local s = "1\r\na\r\n0\r\nA: 1\r\nB: 2\r\n\r\n"
    assert.same({ core.chunked_decode(s) }, { core.chunked_decode(bytes(s)) })
  end)

  -- RFC 9112 §7.1: every chunk line ends with CRLF. A recipient that ends
  -- lines at LF would read another message out of the body (issue 9).
  for name, s in pairs {
    ["a bare LF after the size"] = "3\nabc\r\n0\r\n\r\n",
    ["a bare LF after an extension"] = "3;a=1\nabc\r\n0\r\n\r\n",
    ["a bare LF after a bare ';' (the smuggling example)"] = "2;\nxx\r\n57\r\n0\r\n\r\n",
    ["a bare LF after the data"] = "3\r\nabc\n0\r\n\r\n",
    ["a bare LF after the last chunk"] = "3\r\nabc\r\n0\n\r\n",
    ["a bare LF ending a trailer line"] = "0\r\nT: 1\n\r\n",
    ["a bare LF ending the trailer section"] = "0\r\nT: 1\r\n\n",
    ["a bare LF as the final line"] = "0\r\n\n",
    ["bare LFs everywhere"] = "3\nabc\n0\nT: 1\n\n",
    ["a bare CR after an extension"] = "3;a\rabc\r\n",
    ["a bare CR after the last chunk"] = "0\r\r\n",
  } do
    it("refuses " .. name, function()
      assert.equal("bad chunked framing", bad(s))
    end)
  end

  -- RFC 9112 §7.1.1: *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
  for name, ext in pairs {
    ["a bare ';'"] = ";",
    ["a ';' after an extension"] = ";a;",
    ["two ';'"] = ";;a",
    ["a name that is not a token"] = ";a(b",
    ["a name starting with '='"] = ";=1",
    ["an empty value"] = ";a=",
    ["a value that is not a token"] = ";a=b/c",
    ["an unterminated quoted-string"] = ';a="x',
    ["a control byte in a quoted-string"] = ';a="x\1"',
    ["text after a quoted-string"] = ';a="x"y',
    ["whitespace before the CRLF"] = ";a ",
    ["whitespace after a value before the CRLF"] = ";a=1 ",
    ["a control byte in an extension"] = ";a\1",
  } do
    it("refuses an extension with " .. name, function()
      assert.equal("bad chunked framing", bad("3" .. ext .. "\r\nabc\r\n0\r\n\r\n"))
    end)
  end

  for name, ext in pairs {
    ["a name only"] = ";a",
    ["several"] = ";a;b=1;c=\"x\"",
    ["BWS around ';' and '='"] = " ;\ta = 1 ; b",
    ["a quoted-pair"] = ';a="x\\"y"',
    ["a token value with tchars"] = ";a=!#$%&'*+-.^_`|~09AZ",
  } do
    it("accepts an extension with " .. name, function()
      assert.equal("abc", (decoded("3" .. ext .. "\r\nabc\r\n0\r\n\r\n")))
    end)
  end

  for name, line in pairs {
    ["no colon"] = "X-No-Colon",
    ["whitespace before the colon"] = "X-A : 1",
    ["an empty name"] = ": 1",
    ["a name that is not a token"] = "X(A): 1",
    ["obs-fold"] = " folded",
    ["a control byte in the value"] = "X-A: 1\1",
  } do
    it("refuses a trailer line with " .. name, function()
      assert.equal("bad chunked framing", bad("0\r\nT: ok\r\n" .. line .. "\r\n\r\n"))
    end)
  end

  for name, s in pairs {
    ["an empty size"] = "\r\nabc\r\n0\r\n\r\n",
    ["a non-hex size"] = "g\r\n",
    ["a 0x prefix"] = "0x3\r\nabc\r\n",
    ["a negative size"] = "-3\r\nabc\r\n",
    ["leading whitespace"] = " 3\r\nabc\r\n",
    ["whitespace after the size without extension"] = "3 \r\nabc\r\n",
    ["whitespace inside the size"] = "1 2\r\n",
    ["a bare CR after the size"] = "3\rabc\r\n",
    ["a size past 2^62"] = "4000000000000001\r\n",
    ["a size overflowing 64 bits"] = "10000000000000000000\r\n",
    ["a missing CRLF after data"] = "3\r\nabcd\r\n0\r\n\r\n",
    ["a CR without LF after data"] = "3\r\nabc\rx0\r\n\r\n",
    ["a bare CR in a trailer"] = "0\r\nX: a\rb\r\n\r\n",
    ["a CR without LF ending the trailers"] = "0\r\n\rx",
  } do
    it("refuses " .. name, function()
      assert.equal("bad chunked framing", bad(s))
    end)
  end

  it("accepts a size of exactly 2^62", function()
    assert.same({ "", false, 18 }, { decoded("4000000000000000\r\n") })
  end)

  it("refuses a size line longer than 4096 bytes", function()
    assert.truthy(bad("1;" .. string.rep("x", 4100) .. "\r\na\r\n0\r\n\r\n"))
  end)

  it("refuses a trailer line longer than 4096 bytes", function()
    assert.truthy(bad("0\r\nX: " .. string.rep("v", 4100) .. "\r\n\r\n"))
  end)

  it("gives the same result at every split in two pieces", function()
    local s = "3;ext\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nT: v\r\n\r\nnext"
    local whole = { decoded(s) }
    for i = 1, #s - 1 do
      assert.same(whole, { decoded(cut(s, i)) }, "split after byte " .. i)
    end
  end)

  it("gives the same result byte by byte", function()
    assert.same({ decoded(BODY .. "rest") }, { decoded(bytes(BODY .. "rest")) })
  end)

  it("fails at the same byte however the input is split", function()
    local s = "3\r\nabc\r\n2\r\nxyz\r\n"
    for i = 1, #s - 1 do
      assert.truthy(bad(cut(s, i)), "split after byte " .. i)
    end
  end)
end)

describe("http1_tokens()", function()
  it("splits a list, trimming OWS and skipping empty elements", function()
    assert.same({ "close", "Upgrade", "x y" }, core.http1_tokens(" ,close ,\tUpgrade,, x y ,"))
  end)

  it("returns nothing for an empty value", function()
    assert.same({}, core.http1_tokens(" , "))
  end)
end)

describe("http1_find()", function()
  it("finds a field by lowercase name whatever its case", function()
    assert.equal(2, core.http1_find(head("GET / HTTP/1.1", "Host: a", "X-Request-ID: 1"), "x-request-id"))
  end)

  it("returns nil for a missing field", function()
    assert.is_nil(core.http1_find(head("GET / HTTP/1.1", "Host: a"), "x-request-id"))
  end)
end)
