-- luacheck configuration for `make lint`: lua/ (the DSL, policies, plugins),
-- spec/ and examples/ (busted specs and their helpers), scripts/*.lua.
std = "luajit"
-- The width the C and the Lua modules are written to (STYLE.md: 120 columns).
max_line_length = 120
-- A long string literal (an HTTP fixture, a config snippet, a test's name) reads
-- better whole than cut with `..`; the code around it still keeps 120.
max_string_line_length = false

-- busted's globals (describe, it, assert, spy, ...) in every spec and helper.
files["spec/**"] = {
    std = "+busted",
    -- Specs keep one assertion (or one table literal fed to one) per line, and an
    -- assertion is not rewrapped (issue 10: assertions stay as they are). The longest
    -- today is 163; anything wider than that still warns.
    max_line_length = 165,
}
files["examples/**/*_spec.lua"] = { std = "+busted" }

-- The examples spell out a hook's signature (`function(req)`) even where the body
-- does not read the request: they are what users copy.
files["examples/*.lua"] = { ignore = { "212/req" } }

-- `not (lat > 0)` on purpose: it is also true for NaN, which `lat <= 0` is not.
files["lua/moonproxy/balancer/ewma.lua"] = { ignore = { "581" } }

-- raw_http: an empty `if` branch stands for RFC 9112 §6.3's "no body" case, with
-- its comment, before the chunked / length / close branches.
files["spec/helpers/raw_http.lua"] = { ignore = { "542" } }
