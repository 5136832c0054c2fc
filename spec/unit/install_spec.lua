-- `make install` and the rockspec: what a user installs is complete and runs
-- from its install location (the Lua modules found without
-- MOONPROXY_LUA_PATH), and `luarocks lint` accepts the rockspec.
local function sh(cmd)
  local p = io.popen(cmd .. " 2>&1; echo \"rc=$?\"")
  local out = p:read("*a")
  p:close()
  local rc = tonumber(out:match("rc=(%d+)%s*$"))
  return rc, out
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

describe("make install", function()
  local root, build
  lazy_setup(function()
    root = os.tmpname()
    os.remove(root)
    build = (os.getenv("MOONPROXY_BIN") or "build/moonproxy"):match("^(.*)/[^/]*$") or "build"
    local rc, out = sh("make -s install BUILD=" .. build .. " PREFIX=/usr DESTDIR=" .. root)
    assert(rc == 0, out)
  end)
  lazy_teardown(function()
    if root then sh("rm -rf " .. root) end
  end)

  it("installs the binary, every Lua module and moonproxy.core", function()
    assert.is_true(exists(root .. "/usr/bin/moonproxy"))
    assert.is_true(exists(root .. "/usr/lib/lua/5.1/moonproxy/core.so"))
    for _, dir in ipairs { "", "/moonproxy", "/moonproxy/plugins", "/moonproxy/balancer" } do
      local p = io.popen("ls lua" .. dir .. "/*.lua")
      for file in p:lines() do
        local name = file:match("[^/]+$")
        assert.is_true(exists(root .. "/usr/share/lua/5.1" .. dir .. "/" .. name), dir .. "/" .. name)
      end
      p:close()
    end
  end)

  it("runs from its install location without MOONPROXY_LUA_PATH", function()
    local rc, out = sh("env -u MOONPROXY_LUA_PATH " .. root .. "/usr/bin/moonproxy -t -c examples/api_gateway.lua")
    assert.equal(0, rc, out)
    assert.matches("ok", out)
  end)
end)

describe("moonproxy-scm-1.rockspec", function()
  it("passes luarocks lint", function()
    local rc, out = sh("luarocks lint moonproxy-scm-1.rockspec")
    assert.equal(0, rc, out)
  end)
end)
