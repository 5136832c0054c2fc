-- helpers.tls: certificates made at test time and TLS clients for the specs.
--
-- tls.pki() makes, with the `openssl` command, in a fresh temp folder (once
-- per spec file; remove it with pki:remove() in lazy_teardown):
--   pki.ca                     the test CA (PEM), which signed every leaf below
--   pki.localhost              { cert, key }: "localhost" + IP 127.0.0.1, RSA 2048
--   pki.api                    "api.example.test", RSA 2048
--   pki.wild                   "*.wild.example.test", RSA 2048
--   pki.ecdsa                  "ec.example.test" + "localhost" + 127.0.0.1, ECDSA P-256
--   pki.expired, pki.future    "localhost", valid 2020-2021 / from 2040 on
--   pki.stray_key              a key that matches no certificate
--   pki.client_ca, pki.client  a client CA and a client certificate (CN=client-one) it signed
--   pki.other_client           a client certificate (CN=client-other) from another CA
-- pki:issue(name, opts) makes one more leaf signed by the CA (opts.sans:
-- list of "DNS:x" / "IP:x"; opts.ec; opts.cn; opts.start, opts.stop:
-- YYYYMMDDHHMMSSZ), returning { cert, key }.
-- pki:new_ca(name, cn) makes another CA ({ cert, key, dir }) in the same
-- folder, and pki:issue(name, opts, ca) signs a leaf with it instead.
--
-- Clients (LuaSec 1.2):
--   local c, err = tls.connect(port, { sni = "api.example.test", protocol = "tlsv1_3",
--                                      alpn = { "http/1.1" }, ca = pki.ca, cert = ..., key = ... })
--   c is a helpers.raw_http connection over the TLS socket (c:request, c:read_response...)
--   with c.tls = { version, cipher, alpn, subject (the peer's CN), names (its DNS SANs) }.
--   tls.request(port, req, opts): one request on a new TLS connection (res, err).
--   tls.s_client(port, args, input): `openssl s_client` as a bounded process (10 s).
--   tls.s_server(pair): `openssl s_server -www`, an origin that says whether a session resumed.
--   tls.curl(url, args): curl as a bounded process (timeout given in args or 60 s).
local ssl = require "ssl"
local socket = require "socket"
local h = require "helpers.proxy"
local raw = require "helpers.raw_http"

local M = {}

local function sh(cmd)
    local out, rc = h.run(cmd, 60)
    if rc ~= 0 then error("command failed (" .. tostring(rc) .. "): " .. cmd .. "\n" .. out, 2) end
    return out
end

local Pki = {}
Pki.__index = Pki

local CA_CNF = [[
[ ca ]
default_ca = test_ca
[ test_ca ]
dir = %s
database = $dir/index.txt
serial = $dir/serial
new_certs_dir = $dir/issued
certificate = $dir/ca.pem
private_key = $dir/ca.key
default_md = sha256
policy = anything
unique_subject = no
email_in_dn = no
copy_extensions = none
[ anything ]
commonName = supplied
[ req ]
distinguished_name = dn
prompt = no
[ dn ]
CN = unused
]]

-- A CA in folder dir (its own database) with the given CN; returns { cert, key, dir }.
local function make_ca(dir, cn)
    sh("mkdir -p " .. h.quote(dir .. "/issued"))
    h.write_file(dir .. "/index.txt", "")
    h.write_file(dir .. "/serial", string.format("%04X\n", math.random(4096, 65535)))
    h.write_file(dir .. "/ca.cnf", CA_CNF:format(dir))
    local ca = { cert = dir .. "/ca.pem", key = dir .. "/ca.key", dir = dir }
    sh(string.format("openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 -subj %s"
        .. " -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
        .. " -keyout %s -out %s", h.quote("/CN=" .. cn), h.quote(ca.key), h.quote(ca.cert)))
    return ca
end

local function newkey(path, ec)
    if ec then
        sh("openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out " .. h.quote(path))
    else
        sh("openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out " .. h.quote(path))
    end
end

-- Signs a new leaf with ca (`openssl ca`: its -startdate/-enddate give the
-- expired and not-yet-valid ones on OpenSSL 3.0, whose x509 has no -not_before).
local function sign(ca, dir, name, opts)
    local key, csr, cert, ext = dir .. "/" .. name .. ".key", dir .. "/" .. name .. ".csr",
        dir .. "/" .. name .. ".pem", dir .. "/" .. name .. ".ext"
    newkey(key, opts.ec)
    sh(string.format("openssl req -new -key %s -subj %s -out %s", h.quote(key), h.quote("/CN=" .. opts.cn),
        h.quote(csr)))
    local lines = { "[ leaf ]", "basicConstraints = CA:FALSE" }
    if opts.client then
        lines[#lines + 1] = "extendedKeyUsage = clientAuth"
    else
        lines[#lines + 1] = "extendedKeyUsage = serverAuth"
        lines[#lines + 1] = "subjectAltName = " .. table.concat(opts.sans, ",")
    end
    h.write_file(ext, table.concat(lines, "\n") .. "\n")
    sh(string.format("openssl ca -batch -notext -config %s -in %s -out %s -extfile %s -extensions leaf"
        .. " -startdate %s -enddate %s", h.quote(ca.dir .. "/ca.cnf"), h.quote(csr), h.quote(cert), h.quote(ext),
        opts.start or "20240101000000Z", opts.stop or "20450101000000Z"))
    return { cert = cert, key = key }
end

function M.pki()
    local base = h.tmpname()
    local dir = base .. ".pki"
    sh("mkdir -p " .. h.quote(dir))
    local p = setmetatable({ dir = dir }, Pki)
    p.ca_pair = make_ca(dir .. "/ca", "moonproxy test CA")
    p.ca = p.ca_pair.cert
    p.localhost = p:issue("localhost", { sans = { "DNS:localhost", "IP:127.0.0.1" } })
    p.api = p:issue("api", { sans = { "DNS:api.example.test" } })
    p.wild = p:issue("wild", { sans = { "DNS:*.wild.example.test" } })
    p.ecdsa = p:issue("ecdsa", { ec = true, sans = { "DNS:ec.example.test", "DNS:localhost", "IP:127.0.0.1" } })
    p.expired = p:issue("expired", { sans = { "DNS:localhost" }, start = "20200101000000Z", stop = "20210101000000Z" })
    p.future = p:issue("future", { sans = { "DNS:localhost" }, start = "20400101000000Z", stop = "20410101000000Z" })
    p.stray_key = dir .. "/stray.key"
    newkey(p.stray_key)
    local cca = make_ca(dir .. "/client_ca", "moonproxy test client CA")
    p.client_ca = cca.cert
    p.client = sign(cca, dir, "client", { cn = "client-one", client = true })
    local oca = make_ca(dir .. "/other_ca", "another CA")
    p.other_client = sign(oca, dir, "other_client", { cn = "client-other", client = true })
    return p
end

function Pki:issue(name, opts, ca)
    opts.cn = opts.cn or (opts.sans[1]:match("^DNS:(.*)$") or name)
    return sign(ca or self.ca_pair, self.dir, name, opts)
end

function Pki:new_ca(name, cn)
    return make_ca(self.dir .. "/" .. name, cn)
end

function Pki:remove()
    h.run("rm -rf " .. h.quote(self.dir), 10)
end

--------------------------------------------------------------------------
-- Clients.

-- The peer certificate's CN and DNS names.
local function peer_names(s)
    local cert = s:getpeercertificate()
    if not cert then return nil, {} end
    local cn
    for _, e in ipairs(cert:subject()) do
        if e.name == "commonName" or e.oid == "2.5.4.3" then cn = e.value end
    end
    local names = {}
    local ext = cert:extensions() or {}
    local san = ext["2.5.29.17"]
    for _, n in ipairs(san and san.dNSName or {}) do names[#names + 1] = n end
    return cn, names
end

-- LuaSec's socket as raw_http uses a luasocket one: a record not complete
-- yet ("wantread", "wantwrite") is luasocket's "timeout"; socket.select
-- takes it (getfd, and dirty: bytes decrypted already).
local Shim = {}
Shim.__index = Shim

local function wants(err)
    return (err == "wantread" or err == "wantwrite") and "timeout" or err
end

function Shim:receive(...)
    local data, err, partial = self.s:receive(...)
    return data, wants(err), partial
end

function Shim:send(...)
    local last, err, lastpart = self.s:send(...)
    return last, wants(err), lastpart
end

function Shim:settimeout(t) return self.s:settimeout(t) end
function Shim:getfd() return self.s:getfd() end
function Shim:dirty() return self.s:dirty() end
function Shim:close() return self.s:close() end
function Shim:setoption(...) return self.tcp:setoption(...) end

-- A TLS connection to 127.0.0.1:port. opts: sni, protocol (LuaSec's:
-- "tlsv1_2", "tlsv1_3", "tlsv1_1", or "any": the default), ciphers, alpn (a
-- list), ca (verify the server against it; default: no verification), cert
-- and key (a client certificate), timeout (s, default 5). Returns a
-- raw_http connection with c.tls, or nil, err.
function M.connect(port, opts)
    opts = opts or {}
    local c, err = raw.connect(port, { timeout = opts.timeout })
    if not c then return nil, "connect: " .. tostring(err) end
    local params = {
        mode = "client", protocol = opts.protocol or "any",
        verify = opts.ca and "peer" or "none", cafile = opts.ca,
        certificate = opts.cert, key = opts.key, ciphers = opts.ciphers,
        alpn = opts.alpn, options = "all",
    }
    local s, werr = ssl.wrap(c.sock, params)
    if not s then
        c:close()
        return nil, "wrap: " .. tostring(werr)
    end
    if opts.sni then s:sni(opts.sni) end
    s:settimeout(opts.timeout or raw.DEFAULT_TIMEOUT)
    local ok, herr = s:dohandshake()
    if not ok then
        s:close()
        -- with a timeout set, LuaSec gives up with the direction it was waiting for
        if herr == "wantread" or herr == "wantwrite" then herr = "timeout (" .. herr .. ")" end
        return nil, "handshake: " .. tostring(herr)
    end
    c.sock = setmetatable({ s = s, tcp = c.sock }, Shim)
    local info = s:info() or {}
    local cn, names = peer_names(s)
    c.tls = { version = info.protocol, cipher = info.cipher, alpn = s:getalpn(), subject = cn, names = names }
    return c
end

-- One request on a new TLS connection (closed afterwards): res (res.tls:
-- the connection's c.tls), or nil, err.
function M.request(port, req, opts)
    local c, err = M.connect(port, opts)
    if not c then return nil, err end
    local res, rerr = c:request(req, opts)
    local info = c.tls
    c:close()
    if res then res.tls = info end
    return res, rerr
end

function M.get(port, target, headers, opts)
    return M.request(port, { method = "GET", target = target, headers = headers }, opts)
end

-- helpers/origin.lua serving TLS with pair ({ cert, key }); opts as
-- h.start_origin's, and client_ca (--client-ca: it then requires a client
-- certificate, and its own /_stats calls present opts.client_pair).
function M.start_origin(name, pair, opts)
    opts = opts or {}
    local o = {}
    for k, v in pairs(opts) do o[k] = v end
    o.args = { "--tls", pair.cert, pair.key }
    if opts.client_ca then
        o.args[4], o.args[5] = "--client-ca", opts.client_ca
    end
    local cp = opts.client_pair or {}
    o.get = function(port, target, headers, ropts)
        return M.get(port, target, headers, { timeout = ropts and ropts.timeout, cert = cp.cert, key = cp.key })
    end
    return h.start_origin(name, o)
end

-- `openssl s_client` to 127.0.0.1:port with more arguments (a string of
-- quoted words), input (bytes for its stdin; default nothing). Bounded by 10 s.
-- Returns its output and exit status.
function M.s_client(port, args, input)
    local inp = h.tmpname(".in")
    h.write_file(inp, input or "")
    return h.run(string.format("openssl s_client -connect 127.0.0.1:%d %s < %s", port, args or "", h.quote(inp)), 10)
end

-- `openssl s_server -www` on a free port with pair ({ cert, key }): every
-- connection gets an HTTP/1.0 page (then a close) that tells whether its
-- session was resumed ("Reused, TLSv1.3, ..." or "New, ..."). A Proc with
-- port and addr; stop it with h.shutdown or :stop().
function M.s_server(pair)
    local port = h.free_port()
    local p = h.spawn { "openssl", "s_server", "-accept", "127.0.0.1:" .. port, "-cert", pair.cert, "-key", pair.key,
        "-www", "-quiet" }
    p.port, p.addr = port, "127.0.0.1:" .. port
    h.eventually(function()
        assert(p:alive(), "openssl s_server exited: " .. p:stderr())
        return h.port_open(port)
    end, 10)
    return p
end

-- curl with arguments (quoted words); output and exit status. Bounded.
function M.curl(args, timeout)
    return h.run("curl -sS " .. args, timeout or 60)
end

-- The start of a ClientHello: a handshake record header announcing 512
-- bytes, then only 25 of them (a client that stalls mid-handshake).
function M.partial_hello()
    -- handshake record, TLS 1.0 record version, 512 bytes announced; ClientHello type, length 508
    return "\22\3\1\2\0" .. "\1\0\1\252" .. "\3\3" .. ("\0"):rep(16)
end

M.sleep = socket.sleep

return M
