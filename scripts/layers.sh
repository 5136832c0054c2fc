#!/usr/bin/env bash
# scripts/layers.sh [-v | --list] — checks that src/ keeps its layers (DESIGN.md
# "Layers"): a file includes, and calls by name, only its own layer or lower
# ones; and the include graph has no cycle. Run by `make lint`.
#
#   - every `#include "x.h"` in src/*.c and src/*.h: x's layer must not be above
#     the includer's;
#   - every `mp_<name>(` it can see outside comments and strings: the file that
#     defines mp_<name> (a line in src/*.c, or a header's static inline, that
#     starts a function definition) must not be in a higher layer;
#   - the include graph, file-level with a .c and its .h as one part: an include
#     inside a cycle (both ends in one strongly connected component) fails.
# A .h and its .c are one part: what they do between them is not checked. A file
# not in the table below fails ("add it to the layer table").
#
# Violations that exist today are allowlisted in KNOWN (issue 10 removes them):
# they are counted, not printed (-v prints them). A violation not in KNOWN fails;
# so does a KNOWN entry that no longer occurs, so that the list only shrinks.
# `--list` prints the KNOWN=(...) that matches the tree as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

# The layer of every file in src/: a name is a part (foo.c + foo.h), a name with
# its extension is that file alone (req.h is a type, req.c decides).
LAYERS='
L0 http1 headers buf strbuf router regex balance health log shdict path reframe util common err tls
L1 req.h gen.h config.h
L2 req head l_request balancer gen.c
L2 config.c vm metrics
L2 l_core l_http1 l_router l_config l_shared l_balance l_path
L3 conn upstream pool ctx io static probe tunnel cache compress redis l_http l_redis resolve
L4 worker listener
L5 main reload admin sim guard l_sim status
'
# Why config, vm and the bindings sit where they do (the lowest layer that works):
#   err      L0: a type of DESIGN.md's L1, but its MP_E* are what the pure L0 code (parser,
#                buffers) returns, and common.h includes it; it includes nothing.
#   config.h L1: the configuration's types (settings, routes, upstreams), read by every layer above.
#   config.c L2: builds those tables from what the Lua DSL returned, through vm (config.c includes vm.h).
#   vm       L2: the lua_State and mp_vm_call, the one way into Lua, which the decisions (hooks,
#                balancer policies) call; it needs only log and the binding list (l_core).
#   l_core, l_http1, l_router, l_config, l_shared, l_balance, l_path
#            L2: Lua bindings over L0/L2 code with no sockets; vm opens them in every VM, and
#                moonproxy.core (no server) is built from them.
#   metrics  L2: per-worker counters are pure, but the scrape renders the servers of a configuration
#                (config.h, L1).
#   l_request L2 (DESIGN.md); l_http L3: a call-out over the worker's sockets (beside redis);
#   l_sim    L5: the binding of sim.c.
#   resolve  L3: DNS over c-ares, its own sockets (the blocking lookups of configuration
#                builds, off the worker loops, and a watch on the main loop); config.c (L2)
#                reaches it through the resolver main.c and l_sim.c install (config.h).
# Not checked: fuzz.c (the libFuzzer driver, test-only).
SKIP=" fuzz.c "

# Violations in the tree when this check was written, each "FILE includes HEADER",
# "FILE calls FUNCTION" or "cycle PART -> PART" (an include inside a cycle). Issue 10
# (a one-way request path) removes them; remove an entry when it stops occurring
# (the check fails until you do). Never add one for new code: use a callback.
KNOWN=(
)

mode=check
case ${1:-} in
-v) mode=verbose ;;
--list) mode=list ;;
"") ;;
*) echo "usage: $0 [-v | --list]" >&2; exit 2 ;;
esac

known=$(printf '%s\n' "${KNOWN[@]+"${KNOWN[@]}"}")
rc=0
out=$(awk -v layers="$LAYERS" -v skip="$SKIP" -v known="$known" -v mode="$mode" '
function base(f) { sub(/^.*\//, "", f); return f }
function part(f) { f = base(f); if (f in lay) return f; sub(/\.[ch]$/, "", f); return f }
# stem(F): the name without .c/.h: a header declares the functions of its .c even
# when the two sit in different layers (the types of req.h, the decisions of req.c).
function stem(f) { f = base(f); sub(/\.[ch]$/, "", f); return f }
function layer(f,   b) {
    b = base(f)
    if (b in lay) return lay[b]
    if (part(b) in lay) return lay[part(b)]
    return -1
}

# strip(LINE): the line with comments, string and character literals blanked
# (a call named in a log message or a comment is not a call). IN_COMMENT carries
# a /* comment over lines.
function strip(s,   out, i, n, c, d, q) {
    out = ""; n = length(s); i = 1
    while (i <= n) {
        c = substr(s, i, 1); d = substr(s, i, 2)
        if (in_comment) {
            if (d == "*/") { in_comment = 0; i += 2 } else i++
            continue
        }
        if (d == "/*") { in_comment = 1; out = out " "; i += 2; continue }
        if (d == "//") break
        if (c == "\"" || c == "\047") {
            q = c; i++
            while (i <= n && substr(s, i, 1) != q) i += (substr(s, i, 1) == "\\") ? 2 : 1
            out = out q q; i++
            continue
        }
        out = out c; i++
    }
    return out
}

BEGIN {
    nl = split(layers, rows, "\n")
    for (i = 1; i <= nl; i++) {
        nw = split(rows[i], w, " ")
        if (nw == 0) continue
        l = substr(w[1], 2) + 0
        for (j = 2; j <= nw; j++) lay[w[j]] = l
    }
    nk = split(known, ks, "\n")
    for (i = 1; i <= nk; i++) if (ks[i] != "") { isknown[ks[i]] = 1; nknown++ }
    # every file, even one with no include and no call, must be in the table
    for (i = 1; i < ARGC; i++) {
        if (index(skip, " " base(ARGV[i]) " ")) continue
        nfiles++
        if (layer(ARGV[i]) < 0) unknown[ARGV[i]] = 1
    }
}

FNR == 1 { in_comment = 0; f = FILENAME }
index(skip, " " base(f) " ") { nextfile }

{
    if (match($0, /^[ \t]*#[ \t]*include[ \t]*"[^"]+"/)) {
        t = substr($0, RSTART, RLENGTH); sub(/^[^"]*"/, "", t); sub(/"$/, "", t)
        ninc++; inc_f[ninc] = f; inc_l[ninc] = FNR; inc_t[ninc] = t
    }
    s = strip($0)
    # A definition: a line that opens with its return type and the name, not a
    # prototype; in a header only a static inline body. A directive defines no
    # function, but a macro body is scanned for calls like code.
    if (s !~ /^#/ &&
        s ~ /^[A-Za-z_][A-Za-z0-9_ \t*]*[ \t*]mp_[A-Za-z0-9_]+[ \t]*\(/ && s !~ /;[ \t]*$/ && s !~ /^(typedef|extern)[ \t]/ &&
        (f ~ /\.c$/ ? s !~ /^static[ \t]/ : s ~ /^static[ \t]+inline[ \t]/)) {
        d = s; sub(/[ \t]*\(.*/, "", d); sub(/.*[ \t*]/, "", d)   # the name before the first "("
        if (!(d in def)) def[d] = f
        s = substr(s, index(s, "(") + 1)      # the name is not a call of itself
    }
    while (match(s, /mp_[A-Za-z0-9_]+[ \t]*\(/)) {
        name = substr(s, RSTART, RLENGTH); sub(/[ \t]*\($/, "", name)
        pre = RSTART > 1 ? substr(s, RSTART - 1, 1) : " "
        s = substr(s, RSTART + RLENGTH)
        if (pre ~ /[A-Za-z0-9_]/) continue   # xmp_foo( is not mp_foo(
        if ((f SUBSEP name SUBSEP FNR) in seen) continue
        seen[f SUBSEP name SUBSEP FNR] = 1
        ncall++; call_f[ncall] = f; call_l[ncall] = FNR; call_n[ncall] = name
    }
}

# report(KEY, MESSAGE): a violation; known ones are counted (printed with -v).
function report(key, msg) {
    if (mode == "list") { if (!(key in listed)) { listed[key] = 1; order[++nlisted] = key }; return }
    if (key in isknown) {
        knownseen[key] = 1; nknownseen++
        if (mode == "verbose") print msg " [known]"
        return
    }
    print msg; nnew++
}

# Tarjan: comp[p] is the strongly connected component of part p.
function scc(v,   i, n, ws, x) {
    idx[v] = low[v] = ++counter; stack[++sp] = v; onstack[v] = 1
    n = split(adj[v], ws, " ")
    for (i = 1; i <= n; i++) {
        x = ws[i]
        if (!(x in idx)) { scc(x); if (low[x] < low[v]) low[v] = low[x] }
        else if (onstack[x] && idx[x] < low[v]) low[v] = idx[x]
    }
    if (low[v] == idx[v]) {
        ncomp++
        do { x = stack[sp--]; onstack[x] = 0; comp[x] = ncomp; csize[ncomp]++; cmembers[ncomp] = cmembers[ncomp] " " x } while (x != v)
    }
}

END {
    for (i = 1; i <= ninc; i++) {
        f = inc_f[i]; t = inc_t[i]; lf = layer(f); lt = layer(t)
        where = f ":" inc_l[i] ": "
        if (lf < 0) { unknown[f] = 1; continue }
        if (lt < 0) { print where "includes " t ": not in the layer table: add it to the layer table in scripts/layers.sh"; nunknown++; continue }
        if (part(t) == part(f)) continue
        if (!((part(f) SUBSEP part(t)) in edge)) {
            edge[part(f), part(t)] = where
            adj[part(f)] = adj[part(f)] " " part(t)
            parts[part(f)] = parts[part(t)] = 1
        }
        if (lt > lf) report(base(f) " includes " t, where "includes " t " (L" lt ") from L" lf)
    }
    for (i = 1; i <= ncall; i++) {
        f = call_f[i]; name = call_n[i]; lf = layer(f)
        if (lf < 0) { unknown[f] = 1; continue }
        if (!(name in def)) continue            # a macro, a type, or not ours (a definition in a header)
        d = def[name]; ld = layer(d)
        if (stem(d) == stem(f) || ld <= lf) continue
        report(base(f) " calls " name, f ":" call_l[i] ": calls " name " (" base(d) ", L" ld ") from L" lf)
    }
    for (f in unknown) { print f ": not in the layer table: add it to the layer table in scripts/layers.sh"; nunknown++ }

    # Cycles: an include whose two ends are in one strongly connected component.
    for (p in parts) if (!(p in idx)) scc(p)
    for (k in edge) {
        split(k, e, SUBSEP)
        if (comp[e[1]] != comp[e[2]]) continue
        c = comp[e[1]]
        if (!(c in cycleshown) && mode != "list") {
            cycleshown[c] = 1
            if (mode == "verbose") print "cycle of " csize[c] " parts:" cmembers[c]
            ncycle++
        }
        report("cycle " e[1] " -> " e[2], edge[k] "includes " e[2] ".h, in a cycle of " csize[c] " parts (" substr(cmembers[c], 2) ")")
    }

    if (mode == "list") {
        print "KNOWN=("
        # sorted, so that the list diffs well
        for (i = 1; i <= nlisted; i++) for (j = i + 1; j <= nlisted; j++)
            if (order[j] < order[i]) { x = order[i]; order[i] = order[j]; order[j] = x }
        for (g = 1; g <= 3; g++) {
            print (g == 1 ? "    # an include of a header of a higher layer" : g == 2 ? "    # a call by name into a higher layer" : \
                   "    # an include inside an include cycle (PART -> PART, .c and .h together)")
            for (i = 1; i <= nlisted; i++)
                if ((g == 1 && order[i] ~ / includes /) || (g == 2 && order[i] ~ / calls /) || (g == 3 && order[i] ~ /^cycle /))
                    print "    \"" order[i] "\""
        }
        print ")"
        exit 0
    }
    nstale = 0
    for (k in isknown) if (!(k in knownseen)) {
        print "stale: \"" k "\" no longer occurs: remove it from KNOWN in scripts/layers.sh"; nstale++
    }
    printf "layers: %d files, %d includes, %d calls checked; %d new violation(s), %d known ones seen (%d of the %d KNOWN entries), %d stale, %d unknown file(s), %d cycle(s)\n",
        nfiles, ninc, ncall, nnew, nknownseen, nknown - nstale, nknown, nstale, nunknown, ncycle
    exit (nnew + nstale + nunknown > 0) ? 1 : 0
}' src/*.c src/*.h) || rc=$?
[[ $mode == list ]] && { printf '%s\n' "$out"; exit "$rc"; }
# Violations by file and line, the summary last.
grep -v '^layers: ' <<<"$out" | sort -t: -k1,1 -k2,2n | grep . || true
grep '^layers: ' <<<"$out" || true
exit "$rc"
