-- moonproxy as a rock: `luarocks make` builds with the Makefile and installs
-- the binary, the Lua modules (moonproxy, moonproxy.*) and moonproxy.core.
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
  "lua == 5.1", -- LuaJIT (luajit2)
}
build = {
  type = "make",
  build_target = "all",
  build_variables = {
    CFLAGS = "$(CFLAGS)",
    LUADIR = "$(LUADIR)",
    LIBDIR = "$(LIBDIR)",
    BINDIR = "$(BINDIR)",
  },
  install_target = "install",
  install_variables = {
    LUADIR = "$(LUADIR)",
    LIBDIR = "$(LIBDIR)",
    BINDIR = "$(BINDIR)",
  },
}
