-- End-to-end: the Redis client (src/redis.c) through its test driver
-- (spec/c/redis_driver.c) against a real redis-server: every reply type,
-- pipelines, AUTH and SELECT, timeouts, cancellation, the pool's limits, a
-- server down (calls fail at once while the client backs off) and a restart
-- mid-run (the client reconnects).
local h = require "helpers.proxy"
local rh = require "helpers.redis"
local socket = require "socket"

-- The driver's lines from the first one after "client ..." on.
local function run(script, vars, timeout)
    local out = rh.drive(script, vars, timeout)
    assert.equal(0, out.code, "redis_driver exit " .. tostring(out.code) .. ":\n" .. out.text .. out.stderr)
    assert.matches("^client 127%.0%.0%.1:%d+$", out.lines[1])
    local lines = {}
    for i = 2, #out.lines do lines[#lines + 1] = out.lines[i] end
    return lines, out
end

local function elapsed(line)
    return assert(tonumber(line:match("^elapsed ([%d.]+)$")), "not an elapsed line: " .. tostring(line))
end

-- "k=v" fields of a stats line.
local function stats(line)
    local t = {}
    for k, v in line:gmatch("(%w+)=(%d+)") do t[k] = tonumber(v) end
    assert(t.conns, "not a stats line: " .. tostring(line))
    return t
end

describe("redis client", function()
    local server

    lazy_setup(function()
        server = rh.start()
    end)

    lazy_teardown(function()
        server:cleanup()
        h.cleanup()
    end)

    it("returns status, integer, bulk, nil, arrays (nested, empty) and error replies", function()
        local lines = run([[
client ${addr}
call SET greeting "hello world"
call GET greeting
call GET no:such:key
call INCR counter
call INCRBY counter -5
call PING
call RPUSH list a "" "bin\x00\r\nary"
call LRANGE list 0 -1
call LRANGE no:such:list 0 -1
call EVAL "return {1, {2, {3, 'x'}}, {}, 'y'}" 0
call HGETALL no:such:hash
call NOSUCHCOMMAND arg
call INCR greeting
]], { addr = server.addr })
        assert.same({
            "+OK",
            '"hello world"',
            "nil",
            ":1",
            ":-4",
            "+PONG",
            ":3",
            '["a", "", "bin\\x00\\r\\nary"]',
            "[]",
            '[:1, [:2, [:3, "x"]], [], "y"]',
            "[]",
            "-ERR unknown command 'NOSUCHCOMMAND', with args beginning with: 'arg' ",
            "-ERR value is not an integer or out of range",
        }, lines)
    end)

    it("reads a 2 MB reply and sends a 200 KB argument whole", function()
        local big = string.rep("0123456789", 20000)
        local lines = run([[
client ${addr}
call EVAL "return string.rep('ab', 1000000)" 0
call SET big ${big}
call STRLEN big
call GET big
]], { addr = server.addr, big = big })
        local sum = 0
        for i = 1, #big do sum = sum + big:byte(i) end
        assert.same({
            "bulk(2000000 bytes, sum 195000000)",
            "+OK",
            ":200000",
            "bulk(200000 bytes, sum " .. sum .. ")",
        }, lines)
    end)

    it("runs a pipeline in one call: one reply per command, in order, error replies in place", function()
        local incrs = {}
        for _ = 1, 1000 do incrs[#incrs + 1] = "INCR pipelined" end
        local lines = run([[
client ${addr} pool=1
pipeline DEL p | SET p 1 | INCR p | NOSUCH | GET p | MGET p nokey | LRANGE nolist 0 -1
pipeline ${incrs}
stats
]], { addr = server.addr, incrs = table.concat(incrs, " | ") })
        assert.equal(":0 ; +OK ; :2 ; -ERR unknown command 'NOSUCH', with args beginning with:  ; \"2\" ; [\"2\", nil] ; []",
            lines[1])
        local replies = {}
        for r in (lines[2] .. " ; "):gmatch("(.-) ; ") do replies[#replies + 1] = r end
        assert.equal(1000, #replies)
        assert.equal(":1", replies[1])
        assert.equal(":1000", replies[1000])
        local st = stats(lines[3])
        assert.same({ 1, 1, 1, 0 }, { st.conns, st.idle, st.connects, st.failures })
    end)

    it("SELECTs the client's db on every connection", function()
        local lines = run([[
client ${addr} db=3
call SET in:db3 yes
client ${addr}
call GET in:db3
client ${addr} db=3
call GET in:db3
call DEL in:db3
client ${addr} db=99
call PING
]], { addr = server.addr })
        assert.equal("+OK", lines[1])
        assert.equal("client " .. server.addr, lines[2])
        assert.equal("nil", lines[3])
        assert.equal('"yes"', lines[5])
        assert.equal(":1", lines[6])
        assert.equal("error: redis " .. server.addr .. ": SELECT 99 failed: ERR DB index is out of range", lines[8])
    end)

    it("does not pool a connection that a call left in another state (SELECT, an open MULTI)", function()
        local lines = run([[
client ${addr} pool=1
call SELECT 5
call SET state:key 1
stats
pipeline MULTI | INCR state:m | EXEC
stats
call MULTI
call INCR state:m
stats
client ${addr} db=5
call GET state:key
client ${addr}
call GET state:key
]], { addr = server.addr })
        assert.same({ "+OK", "+OK" }, { lines[1], lines[2] })
        assert.same({ 1, 2 }, { stats(lines[3]).conns, stats(lines[3]).connects }) -- SELECT's was closed
        assert.equal("+OK ; +QUEUED ; [:1]", lines[4])
        assert.equal(2, stats(lines[5]).connects) -- a whole transaction: pooled
        assert.same({ "+OK", ":2" }, { lines[6], lines[7] }) -- not +QUEUED: a new connection
        assert.equal(3, stats(lines[8]).connects)
        assert.equal("nil", lines[10]) -- SET went to db 0, the client's
        assert.equal('"1"', lines[12])
    end)

    it("closes the connection on a reply hiredis cannot read, with no reconnect delay", function()
        local lines = run([[
client ${addr}
call EVAL "return {{{{{{{1}}}}}}}" 0
call EVAL "return {{{{{{{{{1}}}}}}}}}" 0
call PING
stats
]], { addr = server.addr })
        assert.equal("[[[[[[[:1]]]]]]]", lines[1])
        assert.equal("error: redis " .. server.addr .. ": protocol error: No support for nested multi bulk replies with depth > 7",
            lines[2])
        assert.equal("+PONG", lines[3])
        local st = stats(lines[4])
        assert.same({ 1, 2, 0 }, { st.conns, st.connects, st.failures })
    end)

    it("fails a call after its timeout and does not reuse its connection", function()
        local lines = run([[
client ${addr} timeout=5
call t=0.2 BLPOP empty:list 2
elapsed
stats
call PING
stats
]], { addr = server.addr })
        assert.equal("error: redis " .. server.addr .. ": timeout", lines[1])
        local t = elapsed(lines[2])
        assert.is_true(t >= 0.19 and t < 1, "timed out after " .. t .. " s")
        local st = stats(lines[3])
        assert.same({ 0, 1 }, { st.conns, st.connects }) -- closed: its reply would have come later
        assert.equal("+PONG", lines[4])
        assert.same({ 1, 2, 0 }, { stats(lines[5]).conns, stats(lines[5]).connects, stats(lines[5]).failures })
    end)

    it("cancels: the callback never runs, the reply is dropped, the connection serves the next call", function()
        local lines, out = run([[
client ${addr} pool=1
async blocked t=5 BLPOP cancel:list 0.3
sleep 0.05
cancel blocked
stats
async queued GET anything
cancel queued
stats
sleep 0.8
stats
call RPUSH cancel:list v
call LPOP cancel:list
stats
]], { addr = server.addr })
        assert.same({ "blocked: cancelled" }, { lines[1] })
        local st = stats(lines[2])
        assert.same({ 1, 0, 1 }, { st.conns, st.idle, st.cancelled })
        assert.equal("queued: cancelled", lines[3])
        assert.equal(0, stats(lines[4]).queued)
        st = stats(lines[5]) -- BLPOP's nil came and was dropped
        assert.same({ 1, 1, 0 }, { st.conns, st.idle, st.cancelled })
        assert.equal(":1", lines[6])
        assert.equal('"v"', lines[7]) -- not the dropped reply
        st = stats(lines[8])
        assert.same({ 1, 1, 0 }, { st.conns, st.connects, st.failures })
        assert.is_nil(out.text:match("BUG"))
    end)

    it("opens at most pool connections, queues calls in order, refuses past the queue at once", function()
        local lines = run([[
client ${addr} pool=2 queue=2
async a BLPOP pool:a 0.3
async b BLPOP pool:b 0.3
async c ECHO c
async d ECHO d
async e ECHO e
stats
wait
async f t=0.5 BLPOP pool:f 2
async g t=0.5 BLPOP pool:g 2
async h t=0.05 ECHO h
wait
stats
client ${addr} pool=1
async one BLPOP pool:one 0.1
async two ECHO 2
async three ECHO 3
async four ECHO 4
wait
]], { addr = server.addr })
        assert.equal("e: error: redis " .. server.addr .. ": too many calls waiting (2)", lines[1])
        local st = stats(lines[2])
        assert.same({ 2, 0, 2 }, { st.conns, st.idle, st.queued })
        -- c and d wait until a or b (0.3 s, on Redis' 10 Hz clock) leaves them a connection
        assert.is_truthy(lines[3]:match("^[ab]: nil$"), lines[3])
        local ends = { lines[3], lines[4], lines[5], lines[6] }
        table.sort(ends)
        assert.same({ "a: nil", "b: nil", 'c: "c"', 'd: "d"' }, ends)
        -- h waits in the queue behind f and g and times out there
        assert.equal("h: error: redis " .. server.addr .. ": timeout", lines[7])
        ends = { lines[8], lines[9] }
        table.sort(ends)
        assert.same({ "f: error: redis " .. server.addr .. ": timeout", "g: error: redis " .. server.addr .. ": timeout" }, ends)
        st = stats(lines[10])
        assert.same({ 0, 0, 2, 0 }, { st.conns, st.queued, st.connects, st.failures })
        -- on one connection, the waiting calls run in the order they came
        assert.same({ "one: nil", 'two: "2"', 'three: "3"', 'four: "4"' }, { lines[12], lines[13], lines[14], lines[15] })
    end)

    it("keeps 300 concurrent calls on a pool of 4 straight, a fifth of them cancelled", function()
        local script, want = { "client ${addr} pool=4 queue=400" }, {}
        for i = 1, 300 do
            local kind = i % 3
            if i % 30 == 0 then -- Redis ends a BLPOP on its clock (10 Hz): some calls wait for a while
                script[#script + 1] = string.format("async c%d t=10 BLPOP stress:none 0.01", i)
                want["c" .. i] = "nil"
            elseif kind == 0 then
                script[#script + 1] = string.format("async c%d t=10 ECHO v%d", i, i)
                want["c" .. i] = string.format('"v%d"', i)
            elseif kind == 1 then
                script[#script + 1] = string.format("async c%d t=10 SET stress:%d %d | GET stress:%d", i, i, i, i)
                want["c" .. i] = string.format('+OK ; "%d"', i)
            else
                script[#script + 1] = string.format("async c%d t=10 EVAL \"return ARGV[1]\" 0 e%d", i, i)
                want["c" .. i] = string.format('"e%d"', i)
            end
            if i % 5 == 0 then -- in flight or waiting: the callback never runs, the connections stay in step
                script[#script + 1] = "cancel c" .. i
                want["c" .. i] = "cancelled"
            end
        end
        script[#script + 1] = "wait"
        script[#script + 1] = "sleep 0.1"
        script[#script + 1] = "stats"
        local lines, out = run(table.concat(script, "\n") .. "\n", { addr = server.addr })
        local got = {}
        for i = 1, #lines - 1 do
            local name, result = lines[i]:match("^(c%d+): (.*)$")
            assert(name, lines[i])
            assert.is_nil(got[name], "twice: " .. name)
            got[name] = result
        end
        assert.same(want, got)
        local st = stats(lines[#lines])
        assert.same({ 4, 0, 0, 0 }, { st.conns, st.queued, st.cancelled, st.failures })
        assert.is_nil(out.text:match("BUG"))
    end)

    it("ends pending calls with 'client closed' when the client is freed", function()
        local lines = run([[
client ${addr} pool=1
async inflight BLPOP free:list 2
async waiting PING
free
echo freed
]], { addr = server.addr })
        table.sort(lines)
        assert.same({
            "freed",
            "inflight: error: redis " .. server.addr .. ": client closed",
            "waiting: error: redis " .. server.addr .. ": client closed",
        }, lines)
    end)

    it("fails at once while the server is down, retrying after a doubling delay", function()
        local port = h.free_port()
        local addr = "127.0.0.1:" .. port
        local lines = run([[
client ${addr} backoff=0.3,1.2
call t=3 PING
elapsed
call t=3 PING
elapsed
sleep 0.35
call t=3 PING
call t=3 PING
sleep 0.3
call t=3 PING
sleep 0.35
call t=3 PING
stats
]], { addr = addr })
        local refused = "error: redis " .. addr .. ": connect: Connection refused"
        local waiting = "error: redis " .. addr .. ": unavailable (reconnecting): connect: Connection refused"
        assert.equal(refused, lines[1])
        assert.is_true(elapsed(lines[2]) < 0.1)
        assert.equal(waiting, lines[3])
        assert.is_true(elapsed(lines[4]) < 0.05)
        assert.equal(refused, lines[5]) -- 0.35 s later: tried again
        assert.equal(waiting, lines[6]) -- the delay is 0.6 s now
        assert.equal(waiting, lines[7]) -- 0.3 s later: still waiting
        assert.equal(refused, lines[8]) -- 0.65 s after: tried again
        local st = stats(lines[9])
        assert.same({ 0, 3 }, { st.conns, st.failures })
    end)
end)

describe("redis client against a server that never answers", function()
    local listener, addr

    lazy_setup(function()
        -- bound and listening, never accepting: the kernel completes the connects
        listener = assert(socket.bind("127.0.0.1", 0))
        local _, port = listener:getsockname()
        addr = "127.0.0.1:" .. port
    end)

    lazy_teardown(function()
        listener:close()
        h.cleanup()
    end)

    it("takes a server that does not answer AUTH within connect_timeout for gone", function()
        local lines = run([[
client ${addr} password=p connect_timeout=0.5 backoff=2
call t=3 PING
elapsed
call t=2 PING
elapsed
stats
]], { addr = addr })
        assert.equal("error: redis " .. addr .. ": AUTH/SELECT timeout", lines[1])
        local t = elapsed(lines[2])
        assert.is_true(t >= 0.49 and t < 1.5, "timed out after " .. t .. " s")
        assert.equal("error: redis " .. addr .. ": unavailable (reconnecting): AUTH/SELECT timeout", lines[3])
        assert.is_true(elapsed(lines[4]) < 0.05)
        local st = stats(lines[5])
        assert.same({ 0, 1, 1 }, { st.conns, st.connects, st.failures })
    end)

    it("a call that gives up before AUTH is answered leaves the connection going, with no delay", function()
        local lines = run([[
client ${addr} password=p pool=1 connect_timeout=0.5 backoff=1
call t=0.1 PING
stats
call t=0.1 PING
stats
sleep 0.8
stats
]], { addr = addr })
        assert.equal("error: redis " .. addr .. ": timeout", lines[1])
        local st = stats(lines[2]) -- still waiting for AUTH's reply, for nobody
        assert.same({ 1, 1, 0 }, { st.conns, st.connects, st.failures })
        assert.equal("error: redis " .. addr .. ": timeout", lines[3]) -- waited for that connection
        assert.equal(1, stats(lines[4]).connects)
        st = stats(lines[5]) -- connect_timeout: gone, and the server taken for gone
        assert.same({ 0, 1, 1 }, { st.conns, st.connects, st.failures })
    end)

    it("counts a call's timeout from the call, not from the loop's last wake-up", function()
        local lines = run([[
client ${addr}
sleep 0.01
busy 0.3
call t=0.2 PING
elapsed
]], { addr = addr })
        assert.equal("error: redis " .. addr .. ": timeout", lines[1])
        local t = elapsed(lines[2])
        assert.is_true(t >= 0.19 and t < 1, "timed out after " .. t .. " s")
    end)

    it("times out a call with no AUTH to wait for, without a reconnect delay", function()
        local lines = run([[
client ${addr}
call t=0.1 PING
call t=0.1 PING
stats
]], { addr = addr })
        assert.same({ "error: redis " .. addr .. ": timeout", "error: redis " .. addr .. ": timeout" }, { lines[1], lines[2] })
        local st = stats(lines[3])
        assert.same({ 0, 2, 0 }, { st.conns, st.connects, st.failures })
    end)
end)

describe("redis client with a password", function()
    local server

    lazy_setup(function()
        server = rh.start { password = "s3cret pass" }
    end)

    lazy_teardown(function()
        server:cleanup()
        h.cleanup()
    end)

    it("AUTHs on connect with the right password", function()
        local lines = run([[
client ${addr} "password=s3cret pass" db=2
call SET authed 1
call GET authed
stats
]], { addr = server.addr })
        assert.same({ "+OK", '"1"' }, { lines[1], lines[2] })
        assert.same({ 1, 1, 0 }, { stats(lines[3]).conns, stats(lines[3]).connects, stats(lines[3]).failures })
    end)

    it("fails the call with the server's reason for a wrong password, then at once while backing off", function()
        local lines = run([[
client ${addr} password=wrong backoff=1
call PING
call PING
elapsed
]], { addr = server.addr })
        local auth = "AUTH failed: WRONGPASS invalid username-password pair or user is disabled."
        assert.equal("error: redis " .. server.addr .. ": " .. auth, lines[1])
        assert.equal("error: redis " .. server.addr .. ": unavailable (reconnecting): " .. auth, lines[2])
        assert.is_true(elapsed(lines[3]) < 0.05)
    end)

    it("without a password, commands get Redis' NOAUTH error reply", function()
        local lines = run([[
client ${addr}
call GET authed
]], { addr = server.addr })
        assert.equal("-NOAUTH Authentication required.", lines[1])
    end)
end)

describe("redis client across a server restart", function()
    local server

    lazy_setup(function()
        server = rh.start()
    end)

    lazy_teardown(function()
        server:cleanup()
        h.cleanup()
    end)

    local function touch(path)
        h.write_file(path, "")
    end

    local function exists(path)
        return h.read_file(path) ~= nil
    end

    it("fails the call in flight, fails at once while down, reconnects once the server is back", function()
        local sig = {}
        for _, k in ipairs { "r1", "down", "r2", "up", "r3", "up2" } do sig[k] = h.tmpname("." .. k) end
        for _, p in pairs(sig) do os.remove(p) end
        local proc = rh.spawn_driver([[
client ${addr} pool=2 backoff=0.1,0.2
call SET before restart
async inflight t=10 BLPOP restart:list 8
sleep 0.05
signal ${r1}
waitfile ${down} 15
wait
call t=3 PING
elapsed
signal ${r2}
waitfile ${up} 15
sleep 0.3
call t=3 PING
call GET before
stats
signal ${r3}
waitfile ${up2} 15 noloop
call t=3 PING
stats
]], { addr = server.addr, r1 = sig.r1, down = sig.down, r2 = sig.r2, up = sig.up, r3 = sig.r3, up2 = sig.up2 })
        h.eventually(function() return exists(sig.r1) end, 10)
        server:stop()
        touch(sig.down)
        h.eventually(function() return exists(sig.r2) end, 10)
        server:start()
        touch(sig.up)
        -- a restart while the client's connections are idle and its loop does not run: the next
        -- call finds them closed before it uses one
        h.eventually(function() return exists(sig.r3) end, 10)
        server:restart()
        touch(sig.up2)
        local out = rh.result(proc, 30)
        assert.equal(0, out.code, out.text .. out.stderr)
        local l = out.lines
        local prefix = "error: redis " .. server.addr .. ": "
        assert.equal("+OK", l[2])
        assert.equal("inflight: " .. prefix .. "connection closed by the server", l[3])
        -- at once: within the reconnect delay, or (the server's exit took longer) refused
        assert.is_truthy(l[4] == prefix .. "unavailable (reconnecting): connection closed by the server" or
            l[4] == prefix .. "connect: Connection refused", l[4])
        assert.is_true(elapsed(l[5]) < 0.05)
        assert.equal("+PONG", l[6])
        assert.equal("nil", l[7]) -- a new server: persistence is off
        local st = stats(l[8])
        assert.equal(1, st.conns)
        assert.is_true(st.failures >= 1 and st.failures <= 2, l[8])
        assert.equal("+PONG", l[9]) -- no failure: the closed idle connection is not used
        local st2 = stats(l[10])
        assert.same({ 1, st.failures }, { st2.conns, st2.failures })
        assert.is_nil(out.text:match("waitfile"))
    end)

    it("ends each of 104 calls once when the server stops under them, and recovers", function()
        local sig = { r1 = h.tmpname(".r1"), down = h.tmpname(".down"), up = h.tmpname(".up") }
        for _, p in pairs(sig) do os.remove(p) end
        local script = { "client ${addr} pool=4 queue=200 backoff=0.1,0.2" }
        for i = 1, 4 do script[#script + 1] = string.format("async b%d t=10 BLPOP stop:none 5", i) end
        for i = 1, 100 do script[#script + 1] = string.format("async q%d t=10 ECHO %d", i, i) end
        for _, l in ipairs { "sleep 0.05", "stats", "signal ${r1}", "waitfile ${down} 15", "wait", "stats",
                             "waitfile ${up} 15", "sleep 0.3", "call PING", "stats" } do
            script[#script + 1] = l
        end
        local proc = rh.spawn_driver(table.concat(script, "\n") .. "\n",
            { addr = server.addr, r1 = sig.r1, down = sig.down, up = sig.up })
        h.eventually(function() return h.read_file(sig.r1) ~= nil end, 10)
        server:stop()
        h.write_file(sig.down, "")
        server:start()
        h.write_file(sig.up, "")
        local out = rh.result(proc, 30)
        assert.equal(0, out.code, out.text .. out.stderr)
        local l = out.lines
        local st = stats(l[2]) -- before the stop: 4 in flight, 100 waiting
        assert.same({ 4, 100 }, { st.conns, st.queued })
        local prefix = "error: redis " .. server.addr .. ": "
        local seen, n = {}, 0
        for i = 3, #l - 3 do
            local name, result = l[i]:match("^([bq]%d+): (.*)$")
            assert(name, l[i])
            assert.is_nil(seen[name], "twice: " .. name)
            seen[name] = true
            n = n + 1
            if name:match("^b") then
                assert.equal(prefix .. "connection closed by the server", result)
            else
                assert.equal(prefix .. "unavailable (reconnecting): connection closed by the server", result)
            end
        end
        assert.equal(104, n)
        st = stats(l[#l - 2])
        assert.same({ 0, 0 }, { st.conns, st.queued })
        assert.equal("+PONG", l[#l - 1])
        assert.equal(1, stats(l[#l]).conns)
    end)
end)
