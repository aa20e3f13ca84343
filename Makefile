# qbak: plain Makefile with pkg-config (liburing/hiredis manner).
# CFLAGS is the user's; what must hold goes through `override`.

CC      ?= cc
CFLAGS  ?= -O2 -g
PKGS     = jansson glib-2.0 liburing libxxhash libnbd
WARN     = -Wall -Wextra -Wshadow -Wvla -Wformat=2 -Wstrict-prototypes \
           -Wwrite-strings -Wno-unused-parameter
override CFLAGS += -std=gnu11 -D_GNU_SOURCE $(WARN) -I. $(shell pkg-config --cflags $(PKGS))
ifeq ($(CI),true)
override CFLAGS += -Werror
endif
LDLIBS  += $(shell pkg-config --libs $(PKGS))

B        = build
# The binary's path: check-asan builds a second one into build/asan.
QBAK_BIN = qbak
# Every .c under qmp/, io/ and agent/ (and their subfolders) but main.c.
LIB_SRCS = $(filter-out agent/main.c,$(shell find qmp io agent -name '*.c' | sort))
LIB_OBJS = $(LIB_SRCS:%.c=$(B)/%.o)
UNIT_SRCS = $(wildcard tests/unit/test-*.c)
UNIT_BINS = $(UNIT_SRCS:tests/unit/%.c=$(B)/tests/%)
FUZZ_SRCS = $(wildcard tests/fuzz/fuzz-*.c)

all: $(QBAK_BIN) $(UNIT_BINS)

$(QBAK_BIN): $(B)/agent/main.o $(B)/libqbak.a
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(B)/libqbak.a: $(LIB_OBJS)
	rm -f $@ && ar rcs $@ $^

$(B)/%.o: %.c $(shell find qmp io agent -name '*.h')
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c -o $@ $<

$(B)/tests/%: tests/unit/%.c $(B)/libqbak.a $(wildcard tests/unit/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $(filter %.c %.a,$^) $(LDLIBS)

check: all
	tests/run

# The whole suite under AddressSanitizer and UndefinedBehaviorSanitizer, built
# apart in build/asan so the normal build stays as it is.
ASAN_CFLAGS = -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer \
              -fno-sanitize-recover=all
check-asan:
	$(MAKE) B=build/asan QBAK_BIN=build/asan/qbak CFLAGS="$(ASAN_CFLAGS)" all
	QBAK=build/asan/qbak QBAK_UNIT_DIR=build/asan/tests \
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:halt_on_error=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 tests/run

# libFuzzer targets, one per parser of untrusted bytes (clang required).
FUZZ_CFLAGS = -O1 -g -fsanitize=fuzzer,address,undefined -std=gnu11 -D_GNU_SOURCE -I. \
              $(shell pkg-config --cflags $(PKGS))
fuzz: $(FUZZ_SRCS:tests/fuzz/%.c=$(B)/fuzz/%)

$(B)/fuzz/%: tests/fuzz/%.c $(LIB_SRCS) $(shell find qmp io agent -name '*.h')
	@mkdir -p $(dir $@)
	clang $(FUZZ_CFLAGS) -o $@ $< $(LIB_SRCS) $(LDLIBS)

bench: qbak
	scripts/bench.sh

clean:
	rm -rf $(B) qbak

.PHONY: all check check-asan fuzz bench clean
