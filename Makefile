# moonproxy: `make run` and `make test` work on a fresh Debian 12 machine.
BUILD    ?= build
SAN      ?=
PREFIX   ?= /usr/local
BINDIR   ?= $(PREFIX)/bin
LUADIR   ?= $(PREFIX)/share/lua/5.1
LIBDIR   ?= $(PREFIX)/lib/lua/5.1
UNITDIR  ?= $(PREFIX)/lib/systemd/system
LUAJIT_INC ?= /usr/include/luajit-2.1

CC       ?= cc
CFLAGS   ?= -O2 -g
WARN     := -Wall -Wextra -Wshadow
ifeq ($(CI),true)
WARN     += -Werror
endif
CPPFLAGS += -std=c11 -D_GNU_SOURCE -I$(LUAJIT_INC) -DMP_LUA_DIR='"$(LUADIR)"'
ifeq ($(SAN),thread)
CFLAGS   := -O1 -g -fno-omit-frame-pointer -fsanitize=thread -DMP_DEBUG
LDFLAGS  += -fsanitize=thread
else ifneq ($(SAN),)
CFLAGS   := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined -DMP_DEBUG
LDFLAGS  += -fsanitize=address,undefined
endif
LDLIBS   := -lluajit-5.1 -lz -lbrotlienc -lzstd -lev -lcares -lpcre2-8 -lhiredis -lssl -lcrypto -lsystemd -lpthread -lm -ldl

# Everything but main.c also builds as the Lua C module moonproxy.core, which
# moonproxy.testing and the specs use: the same router, hooks and request
# handling as the server, with no sockets.
# (l_sim.c, core.simulator for moonproxy.testing, is the module's alone.)
SRV_SRCS  := $(filter-out fuzz.c l_sim.c,$(notdir $(wildcard src/*.c)))
CORE_SRCS := $(filter-out main.c,$(SRV_SRCS)) l_sim.c

SRV_OBJS  := $(SRV_SRCS:%.c=$(BUILD)/obj/%.o)
CORE_OBJS := $(CORE_SRCS:%.c=$(BUILD)/pic/%.o)

BIN  := $(BUILD)/moonproxy
CORE := $(BUILD)/lib/moonproxy/core.so

# Test drivers of C parts that no spec reaches through the binary yet, run by
# the specs (spec/c/*.c): the Redis client (spec/e2e/redis_spec.lua). `all`
# builds them in a checkout (not in a rock's copy of src/ and lua/ alone).
REDIS_DRIVER := $(BUILD)/redis_driver
REDIS_DRIVER_OBJS := $(addprefix $(BUILD)/obj/,redis.o io.o tls.o log.o util.o err.o)
TEST_BINS := $(if $(wildcard spec/c/redis_driver.c),$(REDIS_DRIVER))

.PHONY: all deps run test test-browser test-run test-asan tsan bench fuzz clean fmt fmt-check lint install

all: $(BIN) $(CORE) $(TEST_BINS)

deps:
	@scripts/deps.sh test

$(BUILD)/obj/%.o: src/%.c | $(BUILD)/obj
	$(CC) $(CPPFLAGS) $(CFLAGS) $(WARN) -MMD -MP -c -o $@ $<

$(BUILD)/pic/%.o: src/%.c | $(BUILD)/pic
	$(CC) $(CPPFLAGS) $(CFLAGS) $(WARN) -fPIC -MMD -MP -c -o $@ $<

$(BIN): $(SRV_OBJS)
	$(CC) $(LDFLAGS) -rdynamic -o $@ $^ $(LDLIBS)

$(CORE): $(CORE_OBJS) | $(BUILD)/lib/moonproxy
	$(CC) $(LDFLAGS) -shared -o $@ $^ -lz -lbrotlienc -lzstd -lev -lcares -lpcre2-8 -lhiredis -lssl -lcrypto -lpthread -lm

$(BUILD)/obj/redis_driver.o: spec/c/redis_driver.c | $(BUILD)/obj
	$(CC) $(CPPFLAGS) -Isrc $(CFLAGS) $(WARN) -MMD -MP -c -o $@ $<

$(REDIS_DRIVER): $(BUILD)/obj/redis_driver.o $(REDIS_DRIVER_OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ -lev -lhiredis -lssl -lcrypto -lpthread -lm

$(BUILD)/obj $(BUILD)/pic $(BUILD)/lib/moonproxy:
	mkdir -p $@

-include $(wildcard $(BUILD)/obj/*.d $(BUILD)/pic/*.d)

run: deps all
	scripts/run-demo.sh $(BIN)

# Every spec: parser and router (core/), Lua modules (unit/), the real binary
# on loopback (e2e/), and each example's spec.
BUSTED := luajit /usr/bin/busted --lpath='lua/?.lua;lua/?/init.lua;spec/?.lua' --cpath='$(BUILD)/lib/?.so'
test: deps all test-run

# The status page rendered by headless Chromium (Debian's chromium, installed
# here only): spec/browser/*_browser.lua, which `make test` leaves out.
test-browser: all
	@scripts/deps.sh browser
	MOONPROXY_BIN=$(BIN) MOONPROXY_LUA_PATH=$(CURDIR)/lua $(BUSTED) --pattern=_browser spec/browser

test-run:
	MOONPROXY_BIN=$(BIN) MOONPROXY_LUA_PATH=$(CURDIR)/lua $(BUSTED) $(BUSTED_ARGS) spec examples

# The same suites under AddressSanitizer + UndefinedBehaviorSanitizer. The
# Lua C module runs inside luajit, so the ASan runtime is preloaded.
test-asan: deps
	$(MAKE) BUILD=build-asan SAN=1 all
	LD_PRELOAD=$$($(CC) -print-file-name=libasan.so):$$($(CC) -print-file-name=libubsan.so) \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	$(MAKE) BUILD=build-asan test-run

# ThreadSanitizer: the shared dictionaries under a multi-thread stress test,
# then the server itself through the specs that cross threads (reloads,
# shared dictionaries across workers, the watchdog, server health, metrics
# scraped while requests run). Thread leaks are not
# reported: past shutdown_timeout the process exits with workers running,
# by design.
TSAN_SPECS := spec/e2e/compress_spec.lua spec/e2e/reload_spec.lua spec/e2e/shared_spec.lua spec/e2e/watchdog_spec.lua spec/e2e/health_spec.lua \
              spec/e2e/metrics_spec.lua spec/e2e/limits_spec.lua spec/e2e/smuggling_spec.lua spec/e2e/path_spec.lua \
              spec/e2e/memory_spec.lua spec/e2e/admin_spec.lua spec/e2e/tls_spec.lua \
              spec/e2e/tls_edges_spec.lua spec/e2e/dns_spec.lua spec/e2e/callout_spec.lua spec/e2e/pool_spec.lua \
              spec/e2e/redis_hooks_spec.lua spec/e2e/ratelimit_redis_spec.lua spec/e2e/websocket_spec.lua \
              spec/e2e/interim_spec.lua spec/e2e/upgrade_gate_spec.lua spec/e2e/logs_spec.lua spec/e2e/tls_store_spec.lua
tsan: deps
	scripts/tsan.sh
	$(MAKE) BUILD=build-tsan SAN=thread $(BUILD_TSAN_BIN)
	TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1:report_thread_leaks=0 MOONPROXY_BIN=build-tsan/moonproxy \
	MOONPROXY_LUA_PATH=$(CURDIR)/lua $(BUSTED:$(BUILD)=build) $(filter $(wildcard $(TSAN_SPECS)),$(TSAN_SPECS))

BUILD_TSAN_BIN := build-tsan/moonproxy

# Lua (luacheck with the repo's .luacheckrc) and the layering of src/
# (scripts/layers.sh: DESIGN.md "Layers", no upward include or call, no
# include cycle). A few seconds. Like `make test`, installs what is missing
# (CI runs it first, on a clean clone).
LUACHECK ?= luacheck
lint: deps
	$(LUACHECK) -q --no-color lua spec examples scripts
	scripts/layers.sh

# clang-format with the repo's .clang-format: `make fmt` rewrites the C in
# place, `make fmt-check` lists the files it would change and fails if any.
CLANG_FORMAT ?= clang-format
FMT_SRCS := $(wildcard src/*.c src/*.h spec/c/*.c spec/fuzz/*.c)
fmt: deps
	$(CLANG_FORMAT) -i $(FMT_SRCS)

fmt-check: deps
	@bad=0; for f in $(FMT_SRCS); do \
		$(CLANG_FORMAT) --dry-run -Werror "$$f" >/dev/null 2>&1 || { echo "$$f: not formatted (make fmt)"; bad=1; }; \
	done; exit $$bad

bench: all
	scripts/deps.sh bench
	scripts/bench.sh $(BIN)

# libFuzzer on the request-head, response-head and chunked parsers.
FUZZ_SECONDS ?= 30
fuzz: deps
	scripts/fuzz.sh $(FUZZ_SECONDS)

# Installs the binary, the Lua modules and moonproxy.core (also what
# `luarocks make` runs, with the rock tree's directories).
install: all
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(LUADIR)/moonproxy/balancer $(DESTDIR)$(LUADIR)/moonproxy/plugins \
		$(DESTDIR)$(LIBDIR)/moonproxy
	install -m 755 $(BIN) $(DESTDIR)$(BINDIR)/moonproxy
	install -m 644 lua/moonproxy.lua $(DESTDIR)$(LUADIR)/moonproxy.lua
	install -m 644 lua/moonproxy/*.lua $(DESTDIR)$(LUADIR)/moonproxy/
	install -m 644 lua/moonproxy/balancer/*.lua $(DESTDIR)$(LUADIR)/moonproxy/balancer/
	install -m 644 lua/moonproxy/plugins/*.lua $(DESTDIR)$(LUADIR)/moonproxy/plugins/
	install -m 755 $(CORE) $(DESTDIR)$(LIBDIR)/moonproxy/core.so
	@# the systemd unit (README "Under systemd"); UNITDIR= (empty, as the rock sets it) leaves it out
	if [ -n "$(UNITDIR)" ]; then \
		install -d $(DESTDIR)$(UNITDIR) && \
		sed 's|@BINDIR@|$(BINDIR)|g' moonproxy.service >$(DESTDIR)$(UNITDIR)/moonproxy.service && \
		chmod 644 $(DESTDIR)$(UNITDIR)/moonproxy.service; \
	fi

clean:
	rm -rf build build-asan build-fuzz build-tsan
