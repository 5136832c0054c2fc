-- helpers.dns: a tiny authoritative DNS server for the specs of upstreams by
-- name (src/resolve.c), over LuaSocket UDP on 127.0.0.1.
--
-- As a script:  luajit spec/helpers/dns.lua PORT ZONE_FILE
--   Answers A queries from ZONE_FILE, read again for every query (so a spec
--   changes the answers while the proxy runs by rewriting it). Its lines:
--     NAME TTL IP [IP...]   A records of NAME (IPv4), with that TTL
--     NAME silent           never answer queries for NAME (a lookup that times out)
--     silent                never answer any query
--   A name that is listed has no AAAA records (NOERROR, no answer); any other
--   name is NXDOMAIN. Each query is logged on stdout: "query NAME TYPE" (and
--   "ignored" when silent), flushed, so a spec can count them.
-- As a module:
--   local dns = require "helpers.dns"
--   local d = dns.start { ["api.test"] = { ttl = 1, "127.0.0.1", "127.0.0.2" } }
--   d.addr      -- "127.0.0.1:PORT", for settings.resolver.nameservers
--   d:set { ["api.test"] = { ttl = 1, "127.0.0.2" }, ["slow.test"] = "silent" }
--   d:queries("api.test")   -- how many queries for that name so far
--   d:stop()
local socket = require "socket"

local M = {}

local function u16(s, i)
    return s:byte(i) * 256 + s:byte(i + 1)
end

local function be16(n)
    return string.char(math.floor(n / 256) % 256, n % 256)
end

local function be32(n)
    return be16(math.floor(n / 65536) % 65536) .. be16(n % 65536)
end

-- The zone: { name = { ttl =, ips = {...} } | "silent" }, and whether all is silent.
local function read_zone(path)
    local zone, silent = {}, false
    local f = io.open(path, "rb")
    if not f then return zone, silent end
    for line in f:lines() do
        local words = {}
        for w in line:gmatch("%S+") do words[#words + 1] = w end
        if words[1] == "silent" and #words == 1 then
            silent = true
        elseif words[2] == "silent" then
            zone[words[1]:lower()] = "silent"
        elseif #words >= 2 then
            local ips = {}
            for i = 3, #words do ips[#ips + 1] = words[i] end
            zone[words[1]:lower()] = { ttl = tonumber(words[2]) or 0, ips = ips }
        end
    end
    f:close()
    return zone, silent
end

-- The question of a query: name (lowercase), qtype, and the offset past it.
local function question(q)
    local i, labels = 13, {}
    for _ = 1, 128 do
        local n = q:byte(i)
        if not n then return nil end
        if n == 0 then break end
        if n >= 64 then return nil end -- no compression in a question we accept
        labels[#labels + 1] = q:sub(i + 1, i + n)
        i = i + 1 + n
    end
    if #q < i + 4 then return nil end
    return table.concat(labels, "."):lower(), u16(q, i + 1), i + 5
end

local function answer(q, zone)
    local name, qtype, past = question(q)
    if not name then return nil end
    local rec = zone[name]
    local rd = math.floor(q:byte(3) % 2) -- the RD bit, echoed
    local rcode = rec and 0 or 3 -- NXDOMAIN for names not in the zone
    local answers = {}
    if rec and qtype == 1 then
        for _, ip in ipairs(rec.ips) do
            local a, b, c, d = ip:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
            if a then
                answers[#answers + 1] = "\192\12" .. be16(1) .. be16(1) .. be32(rec.ttl) .. be16(4)
                    .. string.char(tonumber(a), tonumber(b), tonumber(c), tonumber(d))
            end
        end
    end
    local flags = 0x8400 + rd * 0x100 + rcode -- QR, AA
    return q:sub(1, 2) .. be16(flags) .. be16(1) .. be16(#answers) .. be16(0) .. be16(0)
        .. q:sub(13, past - 1) .. table.concat(answers), name, qtype
end

local function serve(port, zone_path)
    local udp = assert(socket.udp())
    assert(udp:setsockname("127.0.0.1", port))
    udp:settimeout(1)
    io.stdout:write("listening on 127.0.0.1:", port, "\n")
    io.stdout:flush()
    for _ = 1, 1e9 do
        local q, ip, from = udp:receivefrom()
        if q and #q >= 12 then
            local zone, silent = read_zone(zone_path)
            local name, qtype = question(q)
            local quiet = silent or (name and zone[name] == "silent")
            io.stdout:write("query ", tostring(name), " ", tostring(qtype), quiet and " ignored" or "", "\n")
            io.stdout:flush()
            if not quiet then
                local reply = answer(q, zone)
                if reply then udp:sendto(reply, ip, from) end
            end
        end
    end
end

if arg and arg[0] and arg[0]:match("dns%.lua$") and not package.loaded["helpers.dns"] then
    local port, zone = tonumber(arg[1]), arg[2]
    if not port or not zone then
        io.stderr:write("usage: luajit spec/helpers/dns.lua PORT ZONE_FILE\n")
        os.exit(2)
    end
    serve(port, zone)
    return
end

-- The module side ----------------------------------------------------------

local HERE = (debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$")) or "spec/helpers"

local Server = {}
Server.__index = Server

local function zone_text(records)
    local names = {}
    for name in pairs(records) do names[#names + 1] = name end
    table.sort(names)
    local lines = {}
    for _, name in ipairs(names) do
        local r = records[name]
        if name == "*" and r == "silent" then
            lines[#lines + 1] = "silent"
        elseif r == "silent" then
            lines[#lines + 1] = name .. " silent"
        else
            lines[#lines + 1] = name .. " " .. (r.ttl or 1) .. " " .. table.concat(r, " ")
        end
    end
    return table.concat(lines, "\n") .. "\n"
end

-- Replaces the zone (see the script's ZONE_FILE; "*" = "silent" silences all):
-- written beside and renamed, so a query never reads half a file.
function Server:set(records)
    local h = require "helpers.proxy"
    h.write_file(self.zone .. ".new", zone_text(records))
    assert(os.rename(self.zone .. ".new", self.zone))
end

-- How many queries for name (any type) the server received so far.
function Server:queries(name)
    local n = 0
    for line in self.proc:stdout():gmatch("[^\n]+") do
        if line:match("^query (%S+)") == name then n = n + 1 end
    end
    return n
end

function Server:stop()
    self.proc:stop()
    os.remove(self.zone)
end

-- A free UDP port on 127.0.0.1 (bound, read, closed).
local function free_udp_port()
    local u = assert(socket.udp())
    assert(u:setsockname("127.0.0.1", 0))
    local _, port = u:getsockname()
    u:close()
    return tonumber(port)
end

-- Starts the server with records (see Server:set); waits until it listens.
function M.start(records)
    local h = require "helpers.proxy"
    local port = free_udp_port()
    local self = setmetatable({ port = port, addr = "127.0.0.1:" .. port, zone = h.tmpname(".zone") }, Server)
    self:set(records or {})
    self.proc = h.spawn { "luajit", HERE .. "/dns.lua", tostring(port), self.zone }
    h.eventually(function()
        assert(self.proc:alive(), "dns helper exited: " .. self.proc:stderr())
        return self.proc:stdout():find("listening", 1, true)
    end, 10)
    return self
end

return M
