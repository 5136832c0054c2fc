-- moonproxy.balancer.chash: consistent hashing on a ketama-like ring, key for
-- key the same as mp_chash_new/mp_chash_pick in src/balance.c (the contract is
-- in src/balance.h). Interface: see round_robin.lua.
--
-- The key is upstream.hash_key of the request: "header:NAME" (a multi-valued
-- header joined with ", "), "cookie:NAME", "ip" (req.remote_addr), or a
-- function(req) -> string. A request without one uses req.remote_addr.
-- A server gets 640 points per weight unit, drawn from splitmix64 seeded with
-- hash64(addr); a key goes to the first point >= the high 32 bits of its
-- hash64 whose server is available. The ring is built from upstream.servers
-- (else from `servers`), cached per upstream name, and rebuilt when the
-- addresses or weights change.
local bit = require "bit"

local bxor, band, rshift = bit.bxor, bit.band, bit.rshift
local byte, concat, sort, max = string.byte, table.concat, table.sort, math.max
local type, tonumber, tostring = type, tonumber, tostring

local POINTS, MAX_POINTS, SPLIT = 640, 1048576, 65536 -- MP_CHASH_POINTS, MP_CHASH_MAX_POINTS

local _M = {}

-- mp_hash64: FNV-1a 64 over the bytes, then MurmurHash3's fmix64; a uint64 cdata.
function _M.hash64(s)
  local h = 0xcbf29ce484222325ULL
  for i = 1, #s do
    h = bxor(h, byte(s, i)) * 0x100000001b3ULL
  end
  h = bxor(h, rshift(h, 33)) * 0xff51afd7ed558ccdULL
  h = bxor(h, rshift(h, 33)) * 0xc4ceb9fe1a85ec53ULL
  return bxor(h, rshift(h, 33))
end
local hash64 = _M.hash64

-- mp_rand64's output for state z (splitmix64's mix).
local function mix(z)
  z = bxor(z, rshift(z, 30)) * 0xbf58476d1ce4e5b9ULL
  z = bxor(z, rshift(z, 27)) * 0x94d049bb133111ebULL
  return bxor(z, rshift(z, 31))
end

local function weight_of(s)
  local w = s.weight or 1
  return w < 1 and 1 or w
end

-- The ring of list: points (ascending) and owner (position in list).
local function build(list)
  local n, order, total_w = #list, {}, 0
  for i = 1, n do
    order[i] = i
    total_w = total_w + weight_of(list[i])
  end
  sort(order, function(a, b) -- by address bytes, then position: the rank
    local x, y = list[a].addr, list[b].addr
    return x < y or (x == y and a < b)
  end)
  local keys, nk, scale = {}, 0, total_w * POINTS > MAX_POINTS
  for r = 1, n do
    local w = weight_of(list[order[r]])
    local c = scale and w * MAX_POINTS or w * POINTS
    if scale then
      c = max(1, (c - c % total_w) / total_w)
    end
    local seed, z = hash64(list[order[r]].addr), nil
    for j = 0, c - 1 do
      if j % 2 == 0 then -- each mp_rand64 gives two points: high half, then low half
        seed = seed + 0x9e3779b97f4a7c15ULL
        z = mix(seed)
      end
      local point = tonumber(j % 2 == 0 and rshift(z, 32) or band(z, 0xffffffffULL))
      nk = nk + 1
      keys[nk] = point * SPLIT + (r - 1) -- equal points order by rank
    end
  end
  sort(keys)
  local ring = { n = nk, points = {}, owner = {}, addrs = {}, weights = {}, mark = {}, obj = {}, stamp = 0 }
  for j = 1, nk do
    local rank = keys[j] % SPLIT
    ring.points[j], ring.owner[j] = (keys[j] - rank) / SPLIT, order[rank + 1]
  end
  for i = 1, n do
    ring.addrs[i], ring.weights[i] = list[i].addr, weight_of(list[i])
  end
  return ring
end

local function same(ring, list)
  local addrs, weights = ring.addrs, ring.weights
  for i = 1, #list do
    if addrs[i] ~= list[i].addr or weights[i] ~= weight_of(list[i]) then
      return false
    end
  end
  return #addrs == #list
end

local parsed = {} -- hash_key -> { kind, name, cookie pattern }

local function key_of(req, hash_key)
  if type(hash_key) == "function" then
    return hash_key(req)
  elseif hash_key == "ip" or hash_key == nil then
    return req.remote_addr
  end
  local p = parsed[hash_key]
  if not p then
    local kind, name = hash_key:match("^(%a+):(.+)$")
    p = { kind, name, ";%s*" .. (name or ""):gsub("%p", "%%%0") .. "=([^;]*)" }
    parsed[hash_key] = p
  end
  local cookie = p[1] == "cookie"
  local v = req.headers[cookie and "cookie" or p[2]]
  if type(v) == "table" then
    v = concat(v, cookie and "; " or ", ")
  end
  if v and cookie then
    v = ("; " .. v):match(p[3])
    v = v and v:match("^(.-)%s*$")
  end
  return v
end

local rings = {} -- upstream name -> ring

function _M.pick(servers, req, upstream)
  local m = #servers
  if m == 0 then
    return nil
  end
  local name, full = upstream and upstream.name or "", upstream and upstream.servers
  local list = full or servers
  local ring = rings[name]
  if not ring or not same(ring, list) then
    ring = build(list)
    rings[name] = ring
  end
  local stamp, mark, obj = ring.stamp + 1, ring.mark, ring.obj
  ring.stamp = stamp
  for i = 1, m do
    local s = servers[i]
    local pos = full and s.index or i
    mark[pos], obj[pos] = stamp, s
  end
  local key = key_of(req, upstream and upstream.hash_key) or req.remote_addr or ""
  local pos = tonumber(rshift(hash64(tostring(key)), 32))
  local points, owner, np = ring.points, ring.owner, ring.n
  local lo, hi = 1, np + 1 -- the first point >= pos, then clockwise to an available server
  while lo < hi do
    local mid = lo + rshift(hi - lo, 1)
    if points[mid] < pos then
      lo = mid + 1
    else
      hi = mid
    end
  end
  for step = 0, np - 1 do
    local o = owner[(lo + step - 1) % np + 1]
    if mark[o] == stamp then
      return obj[o]
    end
  end
  return nil
end

return _M
