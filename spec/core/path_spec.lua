-- core.path_normalize(): request-path normalisation (src/path.c) against
-- SPEC "Behaviour on the wire" and RFC 3986. The binding normalises in place
-- into a copy that ends at a PROT_NONE page, so a read past the end faults.
local core = require "moonproxy.core"

local KEEP = { escaped_slashes = "keep" }
local DECODE = { escaped_slashes = "decode" }
local NO_MERGE = { merge_slashes = false }

-- Checks one case: want is the normalised path, or a pattern of the reason
-- the path is refused for.
local function check(path, want, opts, refused)
  local got, why = core.path_normalize(path, opts)
  if refused then
    assert(got == nil, string.format("%q should be refused, got %q", path, tostring(got)))
    assert(why:find(want), string.format("%q refused for %q, expected %q", path, why, want))
  else
    assert(got == want, string.format("%q -> %q, expected %q (%s)", path, tostring(got), want, tostring(why)))
  end
end

describe("core.path_normalize() dot segments", function()
  -- RFC 3986 §5.4: each reference resolved against http://a/b/c/d;p?q is
  -- the merged path "/b/c/" .. ref (§5.2.3) with its dot segments removed.
  local rfc = {
    { ".", "/b/c/" }, { "./", "/b/c/" }, { "..", "/b/" }, { "../", "/b/" }, { "../g", "/b/g" },
    { "../..", "/" }, { "../../", "/" }, { "../../g", "/g" }, { "g", "/b/c/g" }, { "./g", "/b/c/g" },
    { "g/", "/b/c/g/" }, { ";x", "/b/c/;x" }, { "g;x", "/b/c/g;x" },
    -- §5.4.2, abnormal examples
    { "g.", "/b/c/g." }, { ".g", "/b/c/.g" }, { "g..", "/b/c/g.." }, { "..g", "/b/c/..g" },
    { "./../g", "/b/g" }, { "./g/.", "/b/c/g/" }, { "g/./h", "/b/c/g/h" }, { "g/../h", "/b/c/h" },
    { "g;x=1/./y", "/b/c/g;x=1/y" }, { "g;x=1/../y", "/b/c/y" },
  }
  for _, c in ipairs(rfc) do
    it(string.format("resolves RFC 3986 §5.4's %q as %q", c[1], c[2]), function()
      check("/b/c/" .. c[1], c[2])
    end)
  end

  it("removes them as RFC 3986 §5.2.4's examples do", function()
    check("/a/b/c/./../../g", "/a/g")
    check("/mid/content=5/../6", "/mid/6")
  end)

  it("refuses a path that climbs above / (RFC 3986 would clamp it)", function()
    for _, p in ipairs { "/..", "/../", "/../g", "/b/c/../../../g", "/a/../..", "/./../x", "/%2e%2e/x", "/.%2E" } do
      check(p, "climbs above /", nil, true)
    end
  end)

  it("removes encoded dot segments", function()
    check("/x/%2e%2e/admin", "/admin")
    check("/%2e/admin", "/admin")
    check("/x/%2E./admin", "/admin")
    check("/x/.%2e", "/")
  end)

  it("keeps the trailing slash a dot segment leaves", function()
    check("/a/.", "/a/")
    check("/a/b/..", "/a/")
    check("/a/..", "/")
    check("/.", "/")
    check("/", "/")
  end)
end)

describe("core.path_normalize() slashes", function()
  it("merges repeated slashes by default", function()
    check("//admin", "/admin")
    check("/a//b///c", "/a/b/c")
    check("/a/b//", "/a/b/")
    check("///", "/")
  end)

  it("keeps them with merge_slashes = false, removing dot segments as RFC 3986 does", function()
    check("//admin", "//admin", NO_MERGE)
    check("/a//b", "/a//b", NO_MERGE)
    check("/a/.//b", "/a//b", NO_MERGE)
    check("/a//../b", "/a/b", NO_MERGE)
    check("//..", "/", NO_MERGE)
  end)

  it("refuses encoded slashes by default", function()
    for _, p in ipairs { "/x/..%2fadmin", "/admin%2F", "/a%5Cb", "/a%5cb", "/%2F" } do
      check(p, "encoded slash", nil, true)
    end
  end)

  it("passes them on encoded, never as separators, with escaped_slashes = keep", function()
    check("/x/..%2fadmin", "/x/..%2Fadmin", KEEP)
    check("/ids/a%2fb", "/ids/a%2Fb", KEEP)
    check("/a%5cb/..", "/", KEEP)
    check("/a/%2F/../b", "/a/b", KEEP)
  end)

  it("decodes them to / and normalises the result with escaped_slashes = decode", function()
    check("/x/..%2fadmin", "/admin", DECODE)
    check("/x%2F..%2Fadmin", "/admin", DECODE)
    check("/a%5Cb", "/a/b", DECODE)
    check("/a%2F%2Fb", "/a/b", DECODE)
    check("/a%2F%2Fb", "/a//b", { escaped_slashes = "decode", merge_slashes = false })
    check("/%2e%2e%2fx", "climbs above /", DECODE, true)
  end)
end)

describe("core.path_normalize() percent-encoding", function()
  it("decodes unreserved characters (RFC 3986 §2.3)", function()
    check("/%61dmin", "/admin")
    check("/%41%7a%30%2D%2e%5F%7E", "/Az0-._~")
  end)

  it("keeps other escapes, with upper-case hex digits (§6.2.2.1)", function()
    check("/a%20b", "/a%20b")
    check("/caf%c3%a9", "/caf%C3%A9")
    check("/a%3fb%23c%25", "/a%3Fb%23c%25")
    check("/%252e%252e/admin", "/%252e%252e/admin") -- decoded once: '%' stays %25
    check("/a%0Ab", "/a%0Ab")
  end)

  it("refuses %00 and a bad escape", function()
    check("/a%00b", "%%00", nil, true)
    for _, p in ipairs { "/a%", "/a%4", "/a%zz", "/a%4g", "/%%41" } do
      check(p, "bad percent%-encoding", nil, true)
    end
  end)

  it("leaves paths case-sensitive", function()
    check("/ADMIN", "/ADMIN")
    check("/%41DMIN", "/ADMIN")
  end)
end)

describe("core.path_normalize() refusals", function()
  it("refuses a backslash and '#'", function()
    check("/a\\b", "backslash", nil, true)
    check("/..\\admin", "backslash", nil, true)
    check("/a#b", "'#'", nil, true)
    check("/a#", "'#'", KEEP, true)
  end)

  it("refuses control bytes, space and bytes above 0x7e", function()
    for _, p in ipairs { "/a\0b", "/a\rb", "/a\nb", "/a b", "/a\tb", "/a\127", "/caf\195\169" } do
      check(p, "control byte", nil, true)
    end
  end)

  it("refuses a dot segment with path parameters, as servlet containers would remove it", function()
    for _, p in ipairs { "/x/..;/admin", "/x/..;x=1/admin", "/x/.;/admin", "/x/%2e%2e;/admin", "/x/.%2E;a",
                         "/..;", "/.;x", "/x/%2e;y/admin", "/a;x/..;" } do
      for _, opts in ipairs { {}, KEEP, DECODE, NO_MERGE } do
        check(p, "path parameters", opts, true)
        assert.is_false(core.path_is_normal(p, opts), p)
      end
    end
    -- path parameters on other segments are kept as they are (nginx does)
    for _, p in ipairs { "/admin;x", "/a/..x;y/b", "/a/;/b", "/a/...;/b", "/a;..;/b" } do
      check(p, p)
      assert.is_true(core.path_is_normal(p), p)
    end
  end)

  it("refuses a path that does not start with /", function()
    check("", "does not start", nil, true)
    check("admin", "does not start", nil, true)
    check("*", "does not start", nil, true)
  end)
end)

describe("core.path_is_normal()", function()
  it("says yes only when path_normalize would not change the path", function()
    for _, p in ipairs { "/", "/a/b", "/a/b/", "/a.b/..c/.d", "/x;y=1/z", "/a-b_c~d" } do
      assert.is_true(core.path_is_normal(p), p)
      check(p, p)
    end
    for _, p in ipairs { "//a", "/a/./b", "/a/..", "/.", "/%61", "/a\\b", "/a#b", "/a b", "a" } do
      assert.is_false(core.path_is_normal(p), p)
    end
    assert.is_true(core.path_is_normal("//a", NO_MERGE))
  end)

  it("agrees with path_normalize on random paths", function()
    -- bounded: 4000 paths of up to 12 units from an alphabet of the
    -- characters that matter; a fixed seed keeps a failure reproducible
    local units = { "/", ".", "..", "a", "%2e", "%2f", "%41", "%", "\\", "#", "%00", "%5c", " ", ";" }
    math.randomseed(9)
    for _ = 1, 4000 do
      local parts = { "/" }
      for k = 1, math.random(0, 12) do
        parts[k + 1] = units[math.random(#units)]
      end
      local p = table.concat(parts)
      for _, opts in ipairs { {}, KEEP, DECODE, NO_MERGE } do
        local got = core.path_normalize(p, opts)
        if core.path_is_normal(p, opts) then
          assert(got == p, string.format("%q is called normal but normalises to %q", p, tostring(got)))
        end
        if got then -- normalising is idempotent, and its output is normal unless it has escapes
          assert.equal(got, core.path_normalize(got, opts))
          assert(got:find("%", 1, true) or core.path_is_normal(got, opts), got)
        end
      end
    end
  end)
end)

describe("core.path_check_query()", function()
  it("passes a query on, and refuses '#', a backslash and control bytes", function()
    assert.is_true(core.path_check_query("x=/../y&z=%2F"))
    assert.is_true(core.path_check_query(""))
    for _, q in ipairs { "a#b", "a\\b", "a\0b", "a\rb", "a b" } do
      local ok, why = core.path_check_query(q)
      assert(ok == nil and why, q)
    end
  end)
end)
