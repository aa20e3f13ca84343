#!/usr/bin/env bash
# build-test-guest.sh: build (and cache) a tiny Linux test guest for qbak.
#
# The guest is a Debian kernel plus a busybox initramfs that runs the real
# QEMU guest agent (qemu-ga) and a writer that keeps writing verifiable files
# to an ext4 data disk, so tests can do real guest-fsfreeze-freeze/thaw.
# Everything comes from Debian packages fetched with `apt-get download` and
# unpacked with `dpkg -x`; nothing is installed on the host except the host
# tools named in ensure_tools (cpio, xz-utils, e2fsprogs, qemu-utils).
#
# Usage:
#   scripts/build-test-guest.sh [build] [--force]
#       Build the kernel and initramfs into the cache directory unless they
#       are already there for this version of the script. Prints (stdout):
#         QBAK_GUEST_KERNEL=<path>   (vmlinux, the ELF kernel booted through
#                                     its PVH entry; vmlinuz if that failed)
#         QBAK_GUEST_INITRD=<path>
#         QBAK_GUEST_APPEND=<kernel command line>
#   scripts/build-test-guest.sh mkdisk <out.qcow2> [size-MiB]
#       Create a qcow2 data disk (default 64 MiB) holding an empty ext4 file
#       system, made on the host without mounting anything.
#
# Cache: ${QBAK_GUEST_DIR:-$HOME/.cache/qbak/guest}; rebuilt when a file is
# missing or when this script's content changed (its sha256 is in `stamp`).
# The downloaded .deb files are kept in <cache>/debs and reused.
#
# Boot (what qbak's tests use; 5-10 s to a responsive agent under TCG):
#   qemu-system-x86_64 -machine q35 -accel tcg -m 256 -nodefaults \
#     -display none -serial file:console.log -no-reboot \
#     -kernel "$QBAK_GUEST_KERNEL" -initrd "$QBAK_GUEST_INITRD" \
#     -append "$QBAK_GUEST_APPEND" \
#     -qmp unix:qmp.sock,server=on,wait=off \
#     -blockdev driver=file,filename=data.qcow2,node-name=file0 \
#     -blockdev driver=qcow2,file=file0,node-name=drive0 \
#     -device virtio-blk-pci,drive=drive0,id=vd0 \
#     -device virtio-serial-pci \
#     -chardev socket,path=qga.sock,server=on,wait=off,id=qga0 \
#     -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0
#
# Guest behaviour (see the /init written below):
#   - mounts the first virtio-blk disk (/dev/vda) at /data (ext4);
#   - starts the writer: file /data/w/NNNNNN (6 digits, from 000000) holds
#     65536 bytes, 2048 lines "qbak-NNNNNN-line-IIII-xxxxxxxxx\n" (IIII the
#     line number from 0000); written to /data/w/.tmp, fsynced, renamed into
#     place, then NNNNNN is appended to /data/w/DONE-log (fsynced too) and
#     file NNNNNN-256 is removed (the newest 256 files are kept). On a later
#     boot it goes on after the last DONE-log entry.
#     scripts/verify-guest-data.sh checks all this on the host.
#   - starts qemu-ga on the virtio-serial port named org.qemu.guest_agent.0
#     (found through /sys/class/virtio-ports/*/name), after /data is mounted,
#     so the first freeze always covers /data.
#   - QGA guest-shutdown stops the writer, unmounts /data and powers off.
#   Kernel command line knobs: qbak.writer=0 (no writer), qbak.interval=SEC
#   (pause between files, default 0.2), qbak.data=/dev/vdX (data disk).
#   - /usr/bin/qbak-ring (for tests/integration/test-vmstate.py): keeps a
#     counter and random data in RAM and writes random tokens to a ring of
#     O_DIRECT disk slots while logging them in RAM; checks on request that
#     the disk equals the log (see its source below).
#   - /usr/bin/qbak-lat (for scripts/bench_guest.py): times O_DIRECT writes
#     from inside the guest; a small static C program built here with the
#     host's cc (left out, with a message, when that fails).
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
CACHE=${QBAK_GUEST_DIR:-${HOME:-/tmp}/.cache/qbak/guest}
APPEND="console=ttyS0 quiet panic=-1"
# Wanted modules, in load order; their dependencies (read from each .ko's
# .modinfo) are put before them automatically. Missing ones are skipped.
MODULES="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev
virtio_pci virtio_blk virtio_console crc16 mbcache jbd2 crc32c_generic ext4"

log() { echo "build-test-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

export DEBIAN_FRONTEND=noninteractive
APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" = 0 ]; then
        log "running apt-get update"
        apt-get update -qq >&2 || die "apt-get update failed"
        APT_UPDATED=1
    fi
}

# Host tools: command -> Debian package. Installed only when missing.
ensure_tools() {
    local missing=() cmd pkg
    for pair in "$@"; do
        cmd=${pair%%:*} pkg=${pair#*:}
        command -v "$cmd" >/dev/null 2>&1 ||
            [ -x "/usr/sbin/$cmd" ] || [ -x "/sbin/$cmd" ] || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "need packages ${missing[*]} (run as root to install)"
    log "installing host packages: ${missing[*]}"
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 </dev/null; then
        apt_update_once
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 </dev/null ||
            die "apt-get install ${missing[*]} failed"
    fi
}
PATH=$PATH:/usr/sbin:/sbin

# apt-cache, running apt-get update once if the lists are missing.
apt_cache() {
    local out
    out=$(apt-cache "$@" 2>/dev/null) || true
    if [ -z "$out" ]; then
        apt_update_once
        out=$(apt-cache "$@" 2>/dev/null) || true
    fi
    printf '%s\n' "$out"
}

# fetch_debs DIR PKG...: put PKG_*.deb for each PKG in DIR, reusing the copy
# in $CACHE/debs when there is one. Returns 1 if apt-get download fails.
fetch_debs() {
    local dir=$1; shift
    local need=() p f dl aptopt=()
    mkdir -p "$CACHE/debs" || return 1
    for p in "$@"; do
        f=$(find "$CACHE/debs" -maxdepth 1 -name "${p}_*.deb" | head -n 1)
        [ -n "$f" ] || need+=("$p")
    done
    if [ ${#need[@]} -gt 0 ]; then
        log "apt-get download ${need[*]}"
        dl=$(mktemp -d "$CACHE/debs/.dl.XXXXXX") || return 1
        # As root apt would switch to the _apt user, which may not be able
        # to write here (e.g. under /root): download as root.
        [ "$(id -u)" = 0 ] && aptopt=(-o APT::Sandbox::User=root)
        if ! (cd "$dl" && apt-get download -qq "${aptopt[@]}" "${need[@]}" >&2 </dev/null); then
            rm -rf "$dl"
            return 1
        fi
        for p in "${need[@]}"; do
            rm -f "$CACHE/debs/${p}_"*.deb
        done
        mv "$dl"/*.deb "$CACHE/debs/" || return 1
        rm -rf "$dl"
    fi
    for p in "$@"; do
        f=$(find "$CACHE/debs" -maxdepth 1 -name "${p}_*.deb" | head -n 1)
        [ -n "$f" ] && cp "$f" "$dir/" || return 1
    done
}

# fetch_debs, with apt-get update and a retry when it fails (lists missing
# or out of date); the kernel package name is resolved again after it.
fetch_debs_retry() {
    fetch_debs "$@" && return 0
    apt_update_once
    fetch_debs "$@" || die "apt-get download $* failed"
}

kernel_package() {
    local k
    k=$(apt_cache depends linux-image-amd64 |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
    [ -n "$k" ] || die "cannot resolve the kernel package behind linux-image-amd64"
    echo "$k"
}

# Dependencies of a module as listed in its .modinfo section.
mod_depends() {
    tr '\0' '\n' < "$1" | sed -n 's/^depends=//p' | head -n 1 | tr ',' ' '
}

write_init() {
    cat > "$1" <<'EOF'
#!/bin/sh
# qbak test guest init (generated by scripts/build-test-guest.sh)
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
log() { echo "qbak-guest: $*" > /dev/console; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /dev/pts /tmp /data /var
ln -sf /run /var/run
exec < /dev/console > /dev/console 2>&1

WRITER=1 INTERVAL=0.2 DATA=/dev/vda
for arg in $(cat /proc/cmdline); do
    case $arg in
    qbak.writer=*) WRITER=${arg#*=} ;;
    qbak.interval=*) INTERVAL=${arg#*=} ;;
    qbak.data=*) DATA=${arg#*=} ;;
    esac
done

for m in $(cat /etc/qbak-modules); do
    insmod /lib/modules/$m.ko 2>/dev/null || log "insmod $m failed"
done

# wait_for CMD...: retry for up to 15 s.
wait_for() {
    i=0
    while ! "$@"; do
        i=$((i + 1)); [ $i -ge 150 ] && return 1
        usleep 100000
    done
}

find_qga_port() {
    for f in /sys/class/virtio-ports/*/name; do
        [ -r "$f" ] || continue
        if [ "$(cat "$f")" = org.qemu.guest_agent.0 ]; then
            p=${f%/name}; p=/dev/${p##*/}
            [ -c "$p" ] && { QGA_PORT=$p; return 0; }
        fi
    done
    return 1
}

writer() {
    cd /data || return
    mkdir -p w
    n=0
    if [ -s w/DONE-log ]; then
        last=$(tail -n 1 w/DONE-log)
        case $last in
        [0-9][0-9][0-9][0-9][0-9][0-9]) n=$((1$last - 1000000 + 1)) ;;
        *) log "writer: bad last DONE-log line '$last'"; return ;;
        esac
    fi
    log "writer: starting at $n"
    while :; do
        name=$(printf %06d $n)
        awk -v n=$n 'BEGIN { for (i = 0; i < 2048; i++)
            printf "qbak-%06d-line-%04d-xxxxxxxxx\n", n, i }' > w/.tmp || break
        sync w/.tmp || break
        mv w/.tmp w/$name || break
        echo $name >> w/DONE-log || break
        sync w/DONE-log || break
        if [ $n -ge 256 ]; then rm -f w/$(printf %06d $((n - 256))); fi
        n=$((n + 1))
        sleep $INTERVAL
    done
    log "writer: stopped at $n"
}

if wait_for [ -b "$DATA" ]; then
    if mount -t ext4 "$DATA" /data; then
        log "mounted $DATA on /data"
        if [ "$WRITER" = 1 ]; then
            writer &
            echo $! > /run/writer.pid
        fi
    else
        log "mount $DATA failed"
    fi
else
    log "no data disk $DATA"
fi

if wait_for find_qga_port; then
    (
        while :; do
            qemu-ga -m virtio-serial -p "$QGA_PORT" -t /run -f /run/qemu-ga.pid
            log "qemu-ga exited ($?), restarting"
            sleep 1
        done
    ) &
    log "qemu-ga started on $QGA_PORT"
else
    log "no virtio port named org.qemu.guest_agent.0"
fi

while :; do sleep 3600; done
EOF
    # qemu-ga runs "/sbin/shutdown -P|-H|-r +0 ..." for guest-shutdown.
    cat > "$2" <<'EOF'
#!/bin/sh
# qbak test guest shutdown (used by qemu-ga guest-shutdown)
[ -s /run/writer.pid ] && kill $(cat /run/writer.pid) 2>/dev/null
sleep 1
sync
umount /data 2>/dev/null || mount -o remount,ro /data 2>/dev/null
sync
case " $* " in
*" -r "*) reboot -f ;;
*) poweroff -f ;;
esac
EOF
}

# The source of /usr/bin/qbak-lat.
write_lat_source() {
    cat > "$1" <<'EOF'
/* qbak-lat: time synchronous writes from inside the qbak test guest (for
 * scripts/bench_guest.py). Writes -b bytes at random -b aligned offsets
 * across the given files (which must exist: only their existing blocks are
 * written over), opened O_DIRECT (and O_DSYNC with -d), one write every -i
 * microseconds (start to start; back to back when a write takes longer),
 * until file -x exists or -t seconds have passed; -s seeds the offsets.
 * Then prints one line per write:
 * "<CLOCK_REALTIME ns at its start> <latency ns>". */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static int64_t ns(clockid_t c)
{
    struct timespec ts;
    clock_gettime(c, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int usage(void)
{
    fprintf(stderr, "usage: qbak-lat [-b BYTES] [-i USEC] [-t SEC] [-x STOPFILE] [-s SEED] [-d] FILE...\n");
    return 2;
}

int main(int argc, char **argv)
{
    long bs = 4096, interval_us = 5000, max_s = 600;
    int dsync = 0, opt, n, i;
    const char *stop = NULL;
    uint64_t rng = 0x9e3779b97f4a7c15ull;
    while ((opt = getopt(argc, argv, "b:i:t:x:s:d")) != -1) {
        switch (opt) {
        case 'b': bs = atol(optarg); break;
        case 'i': interval_us = atol(optarg); break;
        case 't': max_s = atol(optarg); break;
        case 'x': stop = optarg; break;
        case 's': rng += strtoull(optarg, NULL, 0) * 0x2545f4914f6cdd1dull; break;
        case 'd': dsync = 1; break;
        default: return usage();
        }
    }
    n = argc - optind;
    if (n < 1 || bs < 512 || bs % 512 || interval_us < 0 || interval_us >= 1000000)
        return usage();
    int *fds = calloc(n, sizeof *fds);
    long long *blocks = calloc(n, sizeof *blocks), total = 0;
    void *buf;
    size_t cap = 1 << 16, cnt = 0;
    int64_t *out = malloc(cap * 2 * sizeof *out);
    if (!fds || !blocks || !out || posix_memalign(&buf, 4096, bs)) {
        fprintf(stderr, "qbak-lat: out of memory\n");
        return 1;
    }
    for (i = 0; i < n; i++) {
        struct stat st;
        fds[i] = open(argv[optind + i], O_WRONLY | O_DIRECT | (dsync ? O_DSYNC : 0));
        if (fds[i] < 0 || fstat(fds[i], &st) < 0) {
            fprintf(stderr, "qbak-lat: %s: %s\n", argv[optind + i], strerror(errno));
            return 1;
        }
        blocks[i] = st.st_size / bs;
        total += blocks[i];
    }
    if (total < 1) {
        fprintf(stderr, "qbak-lat: the files hold no whole block\n");
        return 1;
    }
    int64_t end = ns(CLOCK_MONOTONIC) + (int64_t)max_s * 1000000000, next = 0;
    for (;;) {
        int64_t now = ns(CLOCK_MONOTONIC);
        if (now >= end || (stop && access(stop, F_OK) == 0))
            break;
        if (now < next) {
            struct timespec d = { 0, next - now };
            nanosleep(&d, NULL);
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        long long b = (long long)(rng % (uint64_t)total);
        for (i = 0; b >= blocks[i]; i++)
            b -= blocks[i];
        memset(buf, (int)(rng >> 56), bs);
        int64_t real = ns(CLOCK_REALTIME), t0 = ns(CLOCK_MONOTONIC);
        if (pwrite(fds[i], buf, bs, (off_t)b * bs) != bs) {
            fprintf(stderr, "qbak-lat: write: %s\n", strerror(errno));
            return 1;
        }
        int64_t t1 = ns(CLOCK_MONOTONIC);
        next = t0 + interval_us * 1000;
        if (cnt == cap) {
            int64_t *p = realloc(out, cap * 4 * sizeof *out);
            if (!p)
                break;
            out = p;
            cap *= 2;
        }
        out[2 * cnt] = real;
        out[2 * cnt + 1] = t1 - t0;
        cnt++;
    }
    for (size_t k = 0; k < cnt; k++)
        printf("%lld %lld\n", (long long)out[2 * k], (long long)out[2 * k + 1]);
    return 0;
}
EOF
}

# The source of /usr/bin/qbak-ring (tests/integration/test-vmstate.py).
write_ring_source() {
    cat > "$1" <<'EOF'
/* qbak-ring: a guest process whose memory and disk must be restored as one
 * instant. It keeps a counter and RING_MB MiB of random data in RAM (with
 * its checksum), and writes random tokens into a ring of 4 KiB slots of
 * FILE with O_DIRECT, logging each in RAM. When /run/qbak-ring.check
 * exists it stops between two writes, reads every slot back with O_DIRECT
 * and writes /run/qbak-ring.result:
 *   boot=<boot id> counter=<n> ram_ok=<0|1> mismatches=<k> slots=<tok,...>
 * then removes the check file. `qbak-ring -d FILE` prints the slots'
 * tokens from the disk (for a cold-booted guest). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define SLOTS 64
#define SLOT 4096
#define RING_MB 8

static uint64_t sum(const uint64_t *p, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

static void boot_id(char *b, size_t n)
{
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
    b[0] = 0;
    if (f) {
        if (!fgets(b, (int)n, f))
            b[0] = 0;
        fclose(f);
    }
    b[strcspn(b, "\n")] = 0;
}

static int open_ring(const char *path)
{
    int fd = open(path, O_RDWR | O_CREAT | O_DIRECT, 0644);
    void *z;
    if (fd < 0 || posix_memalign(&z, SLOT, SLOT))
        return -1;
    memset(z, 0, SLOT);
    if (lseek(fd, 0, SEEK_END) < SLOTS * SLOT) {
        for (int i = 0; i < SLOTS; i++)
            if (pwrite(fd, z, SLOT, (off_t)i * SLOT) != SLOT)
                return -1;
        fsync(fd);
    }
    free(z);
    return fd;
}

static uint64_t slot_token(int fd, int i, void *buf)
{
    if (pread(fd, buf, SLOT, (off_t)i * SLOT) != SLOT)
        return ~0ull;
    return *(uint64_t *)buf;
}

int main(int argc, char **argv)
{
    void *buf;
    if (posix_memalign(&buf, SLOT, SLOT))
        return 1;
    if (argc == 3 && strcmp(argv[1], "-d") == 0) {
        int fd = open(argv[2], O_RDONLY | O_DIRECT);
        if (fd < 0)
            return 1;
        for (int i = 0; i < SLOTS; i++)
            printf("%s%016llx", i ? "," : "", (unsigned long long)slot_token(fd, i, buf));
        printf("\n");
        return 0;
    }
    if (argc != 2)
        return 2;
    int fd = open_ring(argv[1]);
    if (fd < 0)
        return 1;
    size_t n = (size_t)RING_MB << 17;
    uint64_t *ram = malloc(n * 8), log[SLOTS] = {0}, counter = 0, want;
    if (!ram)
        return 1;
    for (size_t off = 0; off < n * 8;) {
        ssize_t r = getrandom((char *)ram + off, n * 8 - off, 0);
        if (r > 0)
            off += (size_t)r;
    }
    want = sum(ram, n);
    for (int i = 0; i < SLOTS; i++)
        log[i] = slot_token(fd, i, buf);
    if (daemon(0, 0) < 0)
        return 1;
    for (;;) {
        if (access("/run/qbak-ring.check", F_OK) == 0) {
            char id[64];
            int bad = 0;
            FILE *f = fopen("/run/qbak-ring.tmp", "w");
            boot_id(id, sizeof(id));
            for (int i = 0; i < SLOTS; i++)
                bad += slot_token(fd, i, buf) != log[i];
            fprintf(f, "boot=%s counter=%llu ram_ok=%d mismatches=%d slots=", id,
                    (unsigned long long)counter, sum(ram, n) == want, bad);
            for (int i = 0; i < SLOTS; i++)
                fprintf(f, "%s%016llx", i ? "," : "", (unsigned long long)log[i]);
            fprintf(f, "\n");
            fclose(f);
            rename("/run/qbak-ring.tmp", "/run/qbak-ring.result");
            unlink("/run/qbak-ring.check");
        }
        uint64_t tok;
        int slot = (int)(counter % SLOTS);
        if (getrandom(&tok, sizeof(tok), 0) != sizeof(tok))
            continue;
        memset(buf, (int)(tok & 0xff), SLOT);
        memcpy(buf, &tok, sizeof(tok));
        if (pwrite(fd, buf, SLOT, (off_t)slot * SLOT) != SLOT)
            return 1;
        log[slot] = tok;
        counter++;
        struct timespec d = {0, 200 * 1000 * 1000};
        nanosleep(&d, NULL);
    }
}
EOF
}

build() {
    ensure_tools cpio:cpio xz:xz-utils gzip:gzip dpkg-deb:dpkg ldd:libc-bin \
        mkfs.ext4:e2fsprogs
    command -v apt-get >/dev/null || die "apt-get not found"
    local work kpkg kver="" kdir root m f
    work=$(mktemp -d "${TMPDIR:-/tmp}/qbak-guest.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    mkdir -p "$work/debs" "$work/kdeb" "$work/pkg"
    kpkg=$(kernel_package)
    if ! fetch_debs "$work/kdeb" "$kpkg"; then
        apt_update_once
        kpkg=$(kernel_package)
        fetch_debs "$work/kdeb" "$kpkg" || die "apt-get download $kpkg failed"
    fi
    log "kernel package: $kpkg"
    # Drop cached debs of other kernels.
    find "$CACHE/debs" -maxdepth 1 -name 'linux-image-[0-9]*.deb' \
        ! -name "${kpkg}_*" -delete
    fetch_debs_retry "$work/debs" busybox-static qemu-guest-agent
    for f in "$work/debs"/*.deb; do dpkg -x "$f" "$work/pkg"; done

    root=$work/root
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,data,lib/modules}
    cp "$work/pkg/bin/busybox" "$root/bin/busybox"
    local applet
    for applet in $("$root/bin/busybox" --list); do
        [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
    done
    write_init "$root/init" "$root/sbin/shutdown"
    chmod 755 "$root/init" "$root/sbin/shutdown"
    rm -f "$root/bin/shutdown"
    write_lat_source "$work/qbak-lat.c"
    write_ring_source "$work/qbak-ring.c"
    if ${CC:-cc} -static -O2 -s -o "$root/usr/bin/qbak-lat" "$work/qbak-lat.c" >&2 &&
        ${CC:-cc} -static -O2 -s -o "$root/usr/bin/qbak-ring" "$work/qbak-ring.c" >&2; then
        log "built /usr/bin/qbak-lat and /usr/bin/qbak-ring"
    else
        rm -f "$root/usr/bin/qbak-lat" "$root/usr/bin/qbak-ring"
        log "warning: no static C compiler (gcc, libc6-dev): the guest has no" \
            "qbak-lat, the benchmark cannot time guest writes (rebuild with --force)"
    fi

    # The kernel and its modules, dependencies first. Only the files needed
    # are taken out of the (large) kernel package: the wanted modules, then
    # any dependency found missing, in a further pass.
    local kdeb order missing names="$MODULES" pass
    kdeb=$(find "$work/kdeb" -name '*.deb' | head -n 1)
    add_mod() {
        local name=$1 file d
        case " $order " in *" $name "*) return 0 ;; esac
        # Module file names may use - where module names use _.
        local glob=${name//_/[_-]}
        file=$(find "$kdir/kernel" \( -name "$glob.ko" -o -name "$glob.ko.xz" \
            -o -name "$glob.ko.zst" -o -name "$glob.ko.gz" \) 2>/dev/null | head -n 1)
        if [ -z "$file" ]; then
            missing="$missing $name"
            return 0
        fi
        case $file in
        *.xz) xz -dc "$file" > "$root/lib/modules/$name.ko" ;;
        *.gz) gzip -dc "$file" > "$root/lib/modules/$name.ko" ;;
        *.zst) zstd -qdc "$file" > "$root/lib/modules/$name.ko" ;;
        *) cp "$file" "$root/lib/modules/$name.ko" ;;
        esac
        for d in $(mod_depends "$root/lib/modules/$name.ko"); do
            add_mod "$(echo "$d" | tr - _)"
        done
        order="$order $name"
    }
    for pass in 1 2 3 4; do
        local pats=(./boot/vmlinuz-\* ./boot/config-\*)
        for m in $names; do pats+=("*/${m//_/[_-]}.ko*"); done
        # tar fails on patterns that match nothing (built-in modules): the
        # files are looked for afterwards.
        dpkg-deb --fsys-tarfile "$kdeb" |
            tar -x -C "$work/pkg" --wildcards --no-anchored "${pats[@]}" 2>/dev/null || true
        kver=$(find "$work/pkg/boot" -name 'vmlinuz-*' | head -n 1)
        kver=${kver##*/vmlinuz-}
        [ -n "$kver" ] || die "no kernel in $kpkg"
        kdir=$work/pkg/lib/modules/$kver
        order="" missing=""
        rm -f "$root"/lib/modules/*.ko
        for m in $MODULES; do add_mod "$m"; done
        local new=""
        for m in $missing; do
            case " $names " in *" $m "*) ;; *) new="$new $m" ;; esac
        done
        [ -n "$new" ] && [ $pass -lt 4 ] || break
        names="$names $new"
    done
    for m in $missing; do log "module $m not found (built in?), skipped"; done
    echo "$order" | tr ' ' '\n' | sed '/^$/d' > "$root/etc/qbak-modules"
    log "modules:$order"

    # qemu-ga and its libraries.
    local qga=$work/pkg/usr/sbin/qemu-ga libdir=$work/libs ldpath="" lib
    [ -x "$qga" ] || die "qemu-ga not found in qemu-guest-agent"
    cp "$qga" "$root/usr/sbin/qemu-ga"
    if [ "${QBAK_GUEST_DOWNLOAD_LIBS:-0}" = 1 ] || ldd "$qga" | grep -q 'not found'; then
        # The host lacks some of them: take the library packages qemu-ga
        # depends on (recursively) from Debian too.
        local libpkgs
        libpkgs=$(apt_cache depends --recurse --no-recommends --no-suggests \
            --no-conflicts --no-breaks --no-replaces --no-enhances --no-pre-depends \
            qemu-guest-agent | awk '/^lib[^ ]*$/ && !/:i386$/' | sort -u)
        log "downloading libraries for qemu-ga:" "$(echo $libpkgs)"
        mkdir -p "$work/libdebs" "$libdir"
        # shellcheck disable=SC2086
        fetch_debs_retry "$work/libdebs" $libpkgs
        for f in "$work/libdebs"/*.deb; do dpkg -x "$f" "$libdir"; done
        ldpath=$libdir/lib/x86_64-linux-gnu:$libdir/usr/lib/x86_64-linux-gnu
    fi
    local libs ldso=""
    if [ -n "$ldpath" ]; then
        # List them with the downloaded loader, which must match its libc.
        ldso=$libdir/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
        [ -x "$ldso" ] || die "no ld-linux-x86-64.so.2 in the downloaded libc6"
        libs=$("$ldso" --library-path "$ldpath" --list "$qga") || die "listing the libraries of qemu-ga failed"
    else
        libs=$(ldd "$qga") || die "ldd qemu-ga failed"
    fi
    if echo "$libs" | grep -q 'not found'; then
        die "libraries of qemu-ga not found: $(echo "$libs" | grep 'not found')"
    fi
    for lib in $(echo "$libs" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }
                                     $1 ~ /^\// { print $1 }'); do
        # Install under the standard path (/lib/x86_64-linux-gnu, /lib64).
        local dest=$lib
        case $lib in "$libdir"/*) dest=${lib#"$libdir"} ;; esac
        dest=${dest#/usr}
        mkdir -p "$root$(dirname "$dest")"
        cp -L "$lib" "$root$dest"
    done
    # The dynamic loader under its ELF interpreter path.
    [ -z "$ldso" ] || { mkdir -p "$root/lib64"; cp -L "$ldso" "$root/lib64/"; }
    [ -e "$root/lib64/ld-linux-x86-64.so.2" ] || {
        mkdir -p "$root/lib64"
        cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
    }

    (cd "$root" && find . -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc --owner=0:0 --quiet) | gzip -6 > "$work/initrd.gz"
    # Boot the uncompressed ELF vmlinux through its PVH entry point when the
    # kernel has one: QEMU then loads it directly, and TCG does not spend
    # ~2.5 s decompressing the xz bzImage. Otherwise use the bzImage.
    local kfile=vmlinuz bz=$work/pkg/boot/vmlinuz-$kver off
    if grep -q '^CONFIG_PVH=y' "$work/pkg/boot/config-$kver" 2>/dev/null; then
        off=$(LC_ALL=C grep -obUaP '\xFD7zXZ\x00' "$bz" | head -n 1 | cut -d: -f1 || true)
        if [ -n "$off" ] &&
            { tail -c +$((off + 1)) "$bz" || true; } |
                xz --single-stream -dc > "$work/vmlinux" 2>/dev/null &&
            [ "$(head -c 4 "$work/vmlinux" | od -An -c | tr -d ' ')" = '177ELF' ]; then
            kfile=vmlinux
        else
            log "could not extract vmlinux from the bzImage, booting the bzImage"
        fi
    fi
    [ $kfile = vmlinux ] || cp "$bz" "$work/vmlinuz"
    echo "$kver" > "$work/kernel-version"

    rm -f "$CACHE/vmlinux" "$CACHE/vmlinuz"
    mv -f "$work/$kfile" "$CACHE/$kfile"
    mv -f "$work/initrd.gz" "$CACHE/initrd.gz"
    mv -f "$work/kernel-version" "$CACHE/kernel-version"
    script_hash > "$CACHE/stamp"
    rm -rf "$work"
    trap - EXIT
    log "built guest with kernel $kver ($(du -k "$CACHE/initrd.gz" | cut -f1) KiB initramfs)"
}

kernel_file() {
    if [ -s "$CACHE/vmlinux" ]; then echo "$CACHE/vmlinux"; else echo "$CACHE/vmlinuz"; fi
}

script_hash() { sha256sum "$SELF" | cut -d' ' -f1; }

cmd_build() {
    local force=0
    for a in "$@"; do
        case $a in
        --force) force=1 ;;
        *) die "unknown argument $a" ;;
        esac
    done
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.lock"
    flock 9
    if [ $force = 1 ] || [ ! -s "$(kernel_file)" ] || [ ! -s "$CACHE/initrd.gz" ] ||
        [ "$(cat "$CACHE/stamp" 2>/dev/null)" != "$(script_hash)" ]; then
        build
    fi
    exec 9>&-
    echo "QBAK_GUEST_KERNEL=$(kernel_file)"
    echo "QBAK_GUEST_INITRD=$CACHE/initrd.gz"
    echo "QBAK_GUEST_APPEND=$APPEND"
}

cmd_mkdisk() {
    [ $# -ge 1 ] && [ $# -le 2 ] || die "usage: $0 mkdisk OUT.qcow2 [SIZE_MIB]"
    local out=$1 size=${2:-64} raw
    ensure_tools mkfs.ext4:e2fsprogs qemu-img:qemu-utils
    raw=$(mktemp "${TMPDIR:-/tmp}/qbak-disk.XXXXXX")
    truncate -s "${size}M" "$raw"
    # No lazy init: the guest must not write in the background by itself.
    mkfs.ext4 -F -q -L qbakdata -E lazy_itable_init=0,lazy_journal_init=0 "$raw" >&2 ||
        { rm -f "$raw"; die "mkfs.ext4 failed"; }
    qemu-img convert -f raw -O qcow2 "$raw" "$out" ||
        { rm -f "$raw"; die "qemu-img convert failed"; }
    rm -f "$raw"
    echo "$out"
}

case ${1:-build} in
build) shift $(($# > 0 ? 1 : 0)); cmd_build "$@" ;;
--force) cmd_build "$@" ;;
mkdisk) shift; cmd_mkdisk "$@" ;;
-h|--help) sed -n '2,/^set -euo/p' "$SELF" | sed '$d; s/^# \{0,1\}//' ;;
*) die "unknown command $1 (build, mkdisk, --help)" ;;
esac
