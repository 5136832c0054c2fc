-- moonproxy.binding: finds a C binding that only the server has (the
-- call-outs of moonproxy.http and moonproxy.redis), on first use.
local pcall, require, error = pcall, require, error
local fmt = string.format

local _M = {}

local found = {}

-- The module name (e.g. "moonproxy.callout"); without it (outside the
-- server) raises "WHAT: call-outs run in the server; in moonproxy.testing
-- give opts.OPT to answer them" at level, counted from the caller.
function _M.find(name, what, opt, level)
  local mod = found[name]
  if mod then
    return mod
  end
  local ok, m = pcall(require, name)
  if not ok then
    error(fmt("%s: call-outs run in the server; in moonproxy.testing give opts.%s to answer them", what, opt),
      level + 1)
  end
  found[name] = m
  return m
end

return _M
