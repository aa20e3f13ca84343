# qbak: plain Makefile with pkg-config (liburing/hiredis manner).
# CFLAGS is the user's; what must hold goes through `override`.

CC      ?= cc
VERSION  = 0.1.0
CFLAGS  ?= -O2 -g
PKGS     = jansson glib-2.0 liburing libxxhash libguestfs libnbd
# Loaded when first used (io/lazy_libs.c): headers only, not linked.
LAZY_PKGS = libguestfs libnbd
WARN     = -Wall -Wextra -Wshadow -Wvla -Wformat=2 -Wstrict-prototypes \
           -Wwrite-strings -Wno-unused-parameter
override CFLAGS += -std=gnu11 -D_GNU_SOURCE -DQBAK_VERSION='"$(VERSION)"' $(WARN) -I. $(shell pkg-config --cflags $(PKGS))
ifeq ($(CI),true)
override CFLAGS += -Werror
endif
LDLIBS  += $(shell pkg-config --libs $(filter-out $(LAZY_PKGS),$(PKGS)))
# ASan resolves the functions it intercepts (libtirpc's XDR, which
# libguestfs calls) when the program starts; one whose library is loaded
# later stays NULL and the first call crashes.  So the ASan build links
# the lazily loaded libraries as well (LAZY_LINK=1, check-asan).
ifdef LAZY_LINK
LDLIBS  += -Wl,--no-as-needed $(shell pkg-config --libs $(LAZY_PKGS))
endif

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
	$(MAKE) B=build/asan QBAK_BIN=build/asan/qbak CFLAGS="$(ASAN_CFLAGS)" \
		LAZY_LINK=1 all
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

# make install: PREFIX and DESTDIR as usual; the units' paths follow.
PREFIX     ?= /usr/local
BINDIR     ?= $(PREFIX)/bin
MANDIR     ?= $(PREFIX)/share/man
SYSCONFDIR ?= /etc
UNITDIR    ?= $(PREFIX)/lib/systemd/system
INSTALL    ?= install

install: $(QBAK_BIN)
	$(INSTALL) -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(MANDIR)/man1 \
		$(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(SYSCONFDIR)/qbak $(DESTDIR)$(UNITDIR)
	$(INSTALL) -m 755 $(QBAK_BIN) $(DESTDIR)$(BINDIR)/qbak
	$(INSTALL) -m 644 $(wildcard man/*.1) $(DESTDIR)$(MANDIR)/man1
	$(INSTALL) -m 644 $(wildcard man/*.5) $(DESTDIR)$(MANDIR)/man5
	$(INSTALL) -m 644 scripts/qbak.conf.example $(DESTDIR)$(SYSCONFDIR)/qbak/qbak.conf.example
	sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' \
		scripts/systemd/qbak.service.in >$(DESTDIR)$(UNITDIR)/qbak.service
	chmod 644 $(DESTDIR)$(UNITDIR)/qbak.service
	$(INSTALL) -m 644 scripts/systemd/qbak.timer $(DESTDIR)$(UNITDIR)/qbak.timer

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/qbak $(DESTDIR)$(UNITDIR)/qbak.service \
		$(DESTDIR)$(UNITDIR)/qbak.timer $(DESTDIR)$(SYSCONFDIR)/qbak/qbak.conf.example \
		$(addprefix $(DESTDIR)$(MANDIR)/man1/,$(notdir $(wildcard man/*.1))) \
		$(addprefix $(DESTDIR)$(MANDIR)/man5/,$(notdir $(wildcard man/*.5)))

# A Debian package built by debhelper from a copy of the tree, into build/.
DEB_DIR = $(B)/deb/qbak-$(VERSION)
deb:
	rm -rf $(B)/deb && mkdir -p $(DEB_DIR)
	tar -c Makefile README.md agent io qmp man scripts | tar -x -C $(DEB_DIR)
	cp -r scripts/debian $(DEB_DIR)/debian
	cd $(DEB_DIR) && dpkg-buildpackage -b -us -uc
	mv $(B)/deb/qbak_$(VERSION)_*.deb $(B)/

bench: qbak
	scripts/bench.sh

clean:
	rm -rf $(B) qbak

.PHONY: all check check-asan fuzz bench clean install uninstall deb
