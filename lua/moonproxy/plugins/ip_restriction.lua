-- moonproxy.plugins.ip_restriction: allows or denies requests by the client's
-- address (req.remote_addr: the real client, after trusted proxies).
--
--   { "ip_restriction", allow = { "10.0.0.0/8", "2001:db8::/32", "127.0.0.1" },
--     deny = { "10.6.6.0/24" } }
--
-- allow  addresses or CIDRs (IPv4 and IPv6); when given, every other client
--        is denied.
-- deny   addresses or CIDRs that are denied; deny wins over allow.
-- At least one of them is required. A bare address is a /32 (or /128); host
-- bits past the prefix are ignored. IPv4 rules also match IPv4-mapped IPv6
-- clients (::ffff:10.1.2.3), and "::ffff:0:0/96" matches every IPv4 client. A
-- client address that is not a numeric IP matches no rule. Denied: 403.
local util = require "moonproxy.plugins.util"

local parse_ip, cidr_match = util.parse_ip, util.cidr_match

local CACHE_MAX = 4096 -- verdicts kept per plugin instance (per worker)

local function verdict(conf, remote)
  local addr = remote and parse_ip(remote)
  if not addr and remote then
    -- tolerate "[::1]" and a zone ("fe80::1%eth0")
    addr = parse_ip((remote:gsub("^%[(.*)%]$", "%1"):gsub("%%.*$", "")))
  end
  if addr then
    if conf.deny and cidr_match(conf.deny, addr) then
      return false
    elseif conf.allow then
      return cidr_match(conf.allow, addr)
    end
    return true
  end
  return not conf.allow
end

return {
  name = "ip_restriction",

  schema = function(conf)
    local c = util.check(conf, { allow = util.cidrs, deny = util.cidrs })
    if not c.allow and not c.deny then
      util.fail('needs allow = { "10.0.0.0/8", ... } and/or deny = { ... }')
    end
    return { allow = c.allow, deny = c.deny, cache = {}, cached = 0 }
  end,

  on_request = function(conf, req)
    local remote = req.remote_addr
    local ok = remote and conf.cache[remote]
    if ok == nil then
      ok = verdict(conf, remote)
      if remote then
        if conf.cached >= CACHE_MAX then
          conf.cache, conf.cached = {}, 0
        end
        conf.cache[remote], conf.cached = ok, conf.cached + 1
      end
    end
    if not ok then
      return req:respond(403, "forbidden\n")
    end
  end,
}
