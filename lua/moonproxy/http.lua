-- moonproxy.http: HTTP requests from hooks, made without blocking the worker
-- (README "Calling out from hooks"). The hook waits in its coroutine while
-- the worker serves other requests; failures and timeouts return nil, err.
--
--   local res, err = http.request { upstream = auth, method = "POST", path = "/check",
--                                   headers = { authorization = "..." }, timeout = 0.5 }
--   -- or url = "http://127.0.0.1:9100/check"; res = { status, headers, body }
--
-- In moonproxy.testing the spec answers the calls: opts.http = function(request) ... end.
local _M = {}

local callout -- the server's binding (src/l_http.c), found on first use

function _M.request(opts)
  if type(opts) ~= "table" then
    error("http.request: expects a table of options", 2)
  end
  local stub = package.loaded["moonproxy.testing.callouts"]
  if stub then
    return stub.http(opts)
  end
  if not callout then
    local ok, mod = pcall(require, "moonproxy.callout")
    if not ok then
      error("http.request: call-outs run in the server; in moonproxy.testing give opts.http to answer them", 2)
    end
    callout = mod
  end
  callout.start(opts)
  return callout.answer()
end

return _M
