-- moonproxy as a rock: `luarocks make` builds with the Makefile and installs
-- the binary, the Lua modules (moonproxy, moonproxy.*) and moonproxy.core.
--
-- moonproxy needs LuaJIT, and Debian's luarocks defaults to PUC Lua 5.2:
-- tell it the Lua version and where LuaJIT's headers are (both on the
-- command line, nothing is written to any luarocks configuration):
--
--   luarocks --lua-version=5.1 make --local moonproxy-scm-1.rockspec \
--       LUA_INCDIR=/usr/include/luajit-2.1
--
-- (or --tree DIR instead of --local). The Makefile compiles against
-- LUA_INCDIR, so the headers luarocks checked are the ones used, and builds
-- in build/rock, apart from a plain `make`'s build/. The binary lands in the
-- tree's bin/ and finds its modules in the tree's share/lua/5.1.
rockspec_format = "3.0"
package = "moonproxy"
version = "scm-1"
source = {
  url = "git+file:///moonproxy", -- a local checkout: `luarocks make` in the working tree
}
description = {
  summary = "A programmable HTTP/1.1 reverse proxy: a C core with LuaJIT hooks",
  detailed = [[
A libev core owns the sockets, HTTP parsing, upstream pools and health state;
every worker thread embeds a LuaJIT VM running the configuration, routing
rules, hooks, plugins and balancing policies, which reload without a restart
and can be tested offline with busted.]],
  homepage = "file:///moonproxy",
  license = "see README.md",
}
dependencies = {
  "lua == 5.1", -- LuaJIT (luajit2): luarocks --lua-version=5.1
}
build = {
  type = "make",
  build_target = "all",
  build_variables = {
    BUILD = "build/rock",
    CC = "$(CC)",
    CFLAGS = "$(CFLAGS)",
    LUAJIT_INC = "$(LUA_INCDIR)",
    LUADIR = "$(LUADIR)",
    LIBDIR = "$(LIBDIR)",
    BINDIR = "$(BINDIR)",
  },
  install_target = "install",
  install_variables = {
    BUILD = "build/rock",
    UNITDIR = "", -- a rock installs no systemd unit (make install does)
    CC = "$(CC)",
    CFLAGS = "$(CFLAGS)",
    LUAJIT_INC = "$(LUA_INCDIR)",
    LUADIR = "$(LUADIR)",
    LIBDIR = "$(LIBDIR)",
    BINDIR = "$(BINDIR)",
  },
}
