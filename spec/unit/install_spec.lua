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

  it("installs the systemd unit, pointing at the installed binary", function()
    local unit = assert(io.open(root .. "/usr/lib/systemd/system/moonproxy.service")):read("*a")
    assert.matches("\nType=notify\n", unit)
    assert.matches("\nExecStart=/usr/bin/moonproxy\n", unit)
    assert.matches("\nExecReload=/bin/kill %-HUP %$MAINPID\n", unit)
    assert.is_nil(unit:find("@BINDIR@", 1, true))
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

-- The command README.md's "Installing" section gives for luarocks (Debian's
-- luarocks defaults to PUC Lua 5.2; moonproxy is LuaJIT, i.e. Lua 5.1), run
-- on a copy of the sources into a fresh tree under /tmp instead of --local.
local ROCK_CMD = "luarocks --lua-version=5.1 make --local moonproxy-scm-1.rockspec LUA_INCDIR=/usr/include/luajit-2.1"

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

describe("luarocks make", function()
  local src, tree
  lazy_setup(function()
    local rc, out = sh("mktemp -d /tmp/moonproxy-rock-src.XXXXXX")
    assert(rc == 0, out)
    src = out:match("^(%S+)")
    rc, out = sh("mktemp -d /tmp/moonproxy-rock-tree.XXXXXX")
    assert(rc == 0, out)
    tree = out:match("^(%S+)")
    rc, out = sh("cp -R Makefile moonproxy-scm-1.rockspec src lua " .. src .. "/")
    assert(rc == 0, out)
    -- Whatever runs the specs (make test, test-asan) must not leak in:
    -- its make flags and variables, sanitizer preloads, MOONPROXY_LUA_PATH.
    local cmd = ROCK_CMD:gsub("%-%-local", "--tree " .. tree)
    rc, out = sh("cd " .. src .. " && env -u MAKELEVEL -u MFLAGS -u LD_PRELOAD -u ASAN_OPTIONS -u UBSAN_OPTIONS"
      .. " -u TSAN_OPTIONS -u MOONPROXY_LUA_PATH MAKEFLAGS=-j$(nproc) timeout 120 " .. cmd)
    assert(rc == 0, cmd .. "\n" .. out)
  end)
  lazy_teardown(function()
    for _, dir in ipairs { src, tree } do
      if dir and dir:match("^/tmp/moonproxy%-rock%-") then sh("rm -rf " .. dir) end
    end
  end)

  it("builds with the Makefile in build/rock, apart from a plain make's build/", function()
    assert.is_true(exists(src .. "/build/rock/moonproxy"))
    assert.is_true(exists(src .. "/build/rock/lib/moonproxy/core.so"))
    assert.is_false(exists(src .. "/build/moonproxy"))
  end)

  it("installs the binary itself (not a wrapper script) in the tree's bin/", function()
    assert.equal("\127ELF", read(tree .. "/bin/moonproxy"):sub(1, 4))
    local rc, out = sh("test -x " .. tree .. "/bin/moonproxy")
    assert.equal(0, rc, out)
  end)

  it("installs every Lua module in share/lua/5.1 and moonproxy.core in lib/lua/5.1", function()
    assert.equal(read(src .. "/build/rock/lib/moonproxy/core.so"), read(tree .. "/lib/lua/5.1/moonproxy/core.so"))
    local p = io.popen("cd " .. src .. "/lua && find . -name '*.lua'")
    local n = 0
    for file in p:lines() do
      file = file:sub(3)
      assert.is_true(exists(tree .. "/share/lua/5.1/" .. file), file)
      assert.equal(read(src .. "/lua/" .. file), read(tree .. "/share/lua/5.1/" .. file), file)
      n = n + 1
    end
    p:close()
    assert.is_true(n >= 3, "Lua modules found: " .. n)
  end)

  it("registers the rock in the tree", function()
    local rc, out = sh("luarocks --lua-version=5.1 --tree " .. tree .. " list --porcelain moonproxy")
    assert.equal(0, rc, out)
    assert.matches("moonproxy\tscm%-1\tinstalled\t" .. tree:gsub("%p", "%%%0"), out)
  end)

  it("loads moonproxy and moonproxy.core from the tree with `luarocks path`", function()
    local rc, out = sh("cd /tmp && eval \"$(luarocks --lua-version=5.1 --tree " .. tree .. " path)\" && luajit -e '"
      .. "io.write(package.searchpath(\"moonproxy\", package.path), \" \", "
      .. "package.searchpath(\"moonproxy.core\", package.cpath), \"\\n\") "
      .. "local core = require \"moonproxy.core\"; assert(type(core) == \"table\"); "
      .. "assert(type(require \"moonproxy\") == \"table\"); print(\"loaded\")'")
    assert.equal(0, rc, out)
    assert.equal(tree .. "/share/lua/5.1/moonproxy.lua " .. tree .. "/lib/lua/5.1/moonproxy/core.so\nloaded\n",
      (out:gsub("rc=%d+%s*$", "")))
  end)

  it("runs `moonproxy -t` from the tree, with the tree's Lua modules", function()
    -- quickstart.lua, reporting where its `require "moonproxy"` came from
    local conf = src .. "/quickstart.lua"
    local f = assert(io.open(conf, "wb"))
    f:write(read("examples/quickstart.lua"),
      '\nio.stderr:write("dsl=", package.searchpath("moonproxy", package.path), "\\n")\n')
    f:close()
    local rc, out = sh("cd /tmp && env -u MOONPROXY_LUA_PATH -u LD_PRELOAD " .. tree .. "/bin/moonproxy -t -c " .. conf)
    assert.equal(0, rc, out)
    assert.matches("ok", out)
    -- found beside the binary: bin/../share/lua/5.1
    assert.matches("dsl=" .. (tree .. "/bin/../share/lua/5.1/moonproxy.lua"):gsub("%p", "%%%0") .. "\n", out)
  end)
end)
