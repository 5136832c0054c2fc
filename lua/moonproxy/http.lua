-- moonproxy.http: HTTP requests from hooks, made without blocking the worker
-- (README "Calling out from hooks"). The hook waits in its coroutine while
-- the worker serves other requests; failures and timeouts return nil, err.
--
--   local res, err = http.request { upstream = auth, method = "POST", path = "/check",
--                                   headers = { authorization = "..." }, timeout = 0.5 }
--   -- or url = "http://127.0.0.1:9100/check"; res = { status, headers, body }
--
-- In moonproxy.testing the spec answers the calls: opts.http = function(request) ... end.
local binding = require "moonproxy.binding"

local type, rawget, setmetatable, pairs, pcall, error, tostring = type, rawget, setmetatable, pairs, pcall,
  error, tostring
local lower = string.lower

local _M = {}

-- res.headers: names stored lowercase, read in any case.
local headers_mt = {
  __index = function(t, k)
    if type(k) == "string" then
      local l = lower(k)
      if l ~= k then
        return rawget(t, l)
      end
    end
  end,
}

-- A stub's answer may name fields in any case: lowercased (a name given
-- twice in two cases reads as a list, as a repeated field does).
local function lower_names(h)
  local out = {}
  for k, v in pairs(h) do
    local l = type(k) == "string" and lower(k) or k
    local had = out[l]
    if had == nil then
      out[l] = v
    else
      local list = type(had) == "table" and had or { had }
      if type(v) == "table" then
        for i = 1, #v do
          list[#list + 1] = v[i]
        end
      else
        list[#list + 1] = v
      end
      out[l] = list
    end
  end
  return out
end

function _M.request(opts)
  if type(opts) ~= "table" then
    error("http.request: expects a table of options", 2)
  end
  local stub = package.loaded["moonproxy.testing.callouts"]
  local res, err
  if stub then
    -- what the stub raises names the hook's line, as in the server
    local ok
    ok, res, err = pcall(stub.http, opts)
    if not ok then
      error(tostring(res):gsub("^[^\n]-http%.lua:%d+: ", "", 1), 2)
    end
    if type(res) == "table" and type(res.headers) == "table" then
      res.headers = lower_names(res.headers)
    end
  else
    local callout = binding.find("moonproxy.callout", "http.request", "http", 2)
    callout.start(opts)
    res, err = callout.answer()
  end
  if type(res) == "table" and type(res.headers) == "table" then
    setmetatable(res.headers, headers_mt)
  end
  return res, err
end

return _M
