-- moonproxy.plugins.request_size: refuses a request whose declared body is
-- larger than a limit, before anything is forwarded.
--
--   { "request_size", max = "1m" }
--
-- max  required: a number of bytes or "64k", "1m", "1g".
--
-- A Content-Length over max gets 413. A request without Content-Length (a
-- chunked body) is let through here: its size is unknown until it has been
-- streamed, and the core's settings.max_body_size guards streamed bodies. A
-- malformed Content-Length never gets this far (the core answers 400).
local util = require "moonproxy.plugins.util"

local type, tonumber, ipairs = type, tonumber, ipairs

local function too_big(v, max)
  local n = tonumber(v:match("^%s*(%d+)%s*$"))
  return n ~= nil and n > max
end

return {
  name = "request_size",

  schema = function(conf)
    local c = util.check(conf, { max = util.size })
    if not c.max then
      util.fail('needs max = "1m" (or a number of bytes)')
    end
    return { max = c.max }
  end,

  on_request = function(conf, req)
    local cl = req.headers["content-length"]
    if cl == nil then
      return
    end
    local over = false
    if type(cl) == "table" then
      for _, v in ipairs(cl) do
        over = over or too_big(v, conf.max)
      end
    else
      over = too_big(cl, conf.max)
    end
    if over then
      return req:respond(413, "request body too large\n")
    end
  end,
}
