-- static_site.lua: a single-page app served from disk by the proxy, with
-- its API behind it (the backend server below). Check it, then run it (from
-- any folder: the files are found next to this script):
--   moonproxy -t -c examples/static_site.lua
--   moonproxy -c examples/static_site.lua
-- and try:
--   curl -i localhost:8080/                     # index.html, with ETag and Last-Modified
--   curl -i localhost:8080/app/settings/42      # no such file: the app's page (fallback)
--   curl -i localhost:8080/missing.css          # 404: the site route has no fallback
--   curl -i localhost:8080/api/hello            # the backend gets GET /hello
--   curl -i -H 'If-None-Match: "..."' localhost:8080/style.css   # with the ETag seen: 304
--
-- What it shows:
--   * static routes: `static = { root, index, fallback }` instead of an
--     upstream; the route's prefix is removed and the rest is looked up
--     under root;
--   * a fallback for client-side routing (every /app/... URL gets the page);
--   * response hooks on files: res.headers holds Content-Type, ETag and
--     Last-Modified, and a hook may change them or add Cache-Control;
--   * one site: files and an API behind the same address.
--
-- What the proxy does with files, with no configuration:
--   * GET and HEAD only (405 with Allow: GET, HEAD otherwise);
--   * Content-Type from the extension, Content-Length, Last-Modified, ETag;
--     If-None-Match and If-Modified-Since answer 304 Not Modified;
--   * never a file outside root: the path is percent-decoded, a ".."
--     segment is refused (400), and a symlink is followed only when it
--     points inside root (403 otherwise);
--   * a directory is served by its index file; asked for without its final
--     "/" (/docs), it is redirected (301) to /docs/, as nginx does, so that
--     relative links in the page work;
--   * the body is sent by the kernel (sendfile), a little at a time to a slow
--     client (client_body_timeout applies between two writes), and the
--     connection stays open for the next request.
-- Range requests are not supported: the whole file is sent (with no
-- Accept-Ranges header, clients do not ask for parts).
local proxy = require "moonproxy"

proxy.listen { addr = "127.0.0.1:8080" }
proxy.settings { workers = "auto", access_log = "stdout" }

local backend = proxy.upstream "backend" { servers = { "127.0.0.1:9001" } }

-- The site's files. A relative root is relative to this file's folder, not
-- to where moonproxy was started; it must exist when the configuration loads
-- (a typo refuses the configuration, with the route's line).
local ROOT = "./static_site/public"

-- The API: /api/hello reaches the backend as /hello. The longest prefix
-- wins, so the "/" route below never takes /api/ or /app/ requests.
proxy.route { name = "api", prefix = "/api/", strip_prefix = true, upstream = backend }

-- Cache policy, on the response head of every file. The page must be
-- revalidated on each visit (cheap: a 304 by ETag when it did not change),
-- so that a deployment shows at once; assets get a week.
local function caching(req, res)
  local ctype = res.headers["content-type"]
  if type(ctype) == "string" and ctype:find("text/html", 1, true) then
    res.headers["cache-control"] = "no-cache"
  elseif req.path:find("^/assets/") then
    res.headers["cache-control"] = "public, max-age=604800"
  end
end

-- The app's own URLs. /app/settings/42 is looked up as settings/42 under
-- root (the prefix /app/ is removed); there is no such file, so the
-- fallback, /index.html, is served with 200 and the script in the page
-- reads the URL. The fallback is a path inside root, checked at load too.
proxy.route { name = "app", prefix = "/app/", static = { root = ROOT, fallback = "/index.html" },
  on_response = caching }

-- Everything else: the page itself (/ is a directory, so its index,
-- index.html by default), the script, the style sheet, the assets. No
-- fallback here: a missing file is a 404, not a page that breaks the
-- browser's idea of what a missing style sheet is.
proxy.route { name = "site", prefix = "/", static = { root = ROOT, index = "index.html" },
  on_response = caching }

-- Global response hooks run on files too (before the route's).
proxy.on_response(function(req, res)
  res.headers["x-content-type-options"] = "nosniff"
end)
