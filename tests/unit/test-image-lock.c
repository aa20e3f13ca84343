/* Tests for io/image_lock.c against real QEMU programs: qemu-io holding
 * an image (read-only, as a backing file is held, or read-write) must be
 * seen, and qbak's writer locks must keep qemu-io from opening the image.
 *
 * Requires qemu-io and qemu-img (exit 77 without them). */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <glib.h>
#include <glib/gstdio.h>

#include "io/image_lock.h"

/* Waiting longer than this for qemu-io to open the image means a hang. */
#define DEADLINE_US (G_USEC_PER_SEC * 600)

static char *img;

/* qemu-io with the image open until its stdin closes. */
struct holder {
    GPid pid;
    int in;
};

static struct holder
hold(bool read_only)
{
    const char *argv[] = {"qemu-io", "-f", "qcow2", img, NULL, NULL};
    struct holder h = {0};
    g_autoptr(GError) err = NULL;
    gint64 deadline = g_get_monotonic_time() + DEADLINE_US;
    int fd = open(img, O_RDONLY | O_CLOEXEC);
    bool in_use = false;

    if (read_only) {
        argv[3] = "-r";
        argv[4] = img;
    }
    g_assert_true(g_spawn_async_with_pipes(
        NULL, (char **)argv, NULL,
        G_SPAWN_SEARCH_PATH | G_SPAWN_DO_NOT_REAP_CHILD |
            G_SPAWN_STDOUT_TO_DEV_NULL | G_SPAWN_STDERR_TO_DEV_NULL,
        NULL, NULL, &h.pid, &h.in, NULL, NULL, &err));
    g_assert_no_error(err);
    g_assert_cmpint(fd, >=, 0);
    while (!in_use) {
        g_assert_true(image_lock_in_use(fd, &in_use, &err));
        g_assert_cmpint(g_get_monotonic_time(), <, deadline);
        if (!in_use) {
            g_usleep(10000);
        }
    }
    close(fd);
    return h;
}

static void
release(struct holder *h)
{
    int status;

    close(h->in);
    g_assert_cmpint(waitpid(h->pid, &status, 0), ==, h->pid);
    g_spawn_close_pid(h->pid);
}

/* Whether qemu-io can open the image read-only (as a backing file). */
static bool
qemu_opens(void)
{
    const char *argv[] = {"qemu-io", "-r",   "-f", "qcow2",
                          "-c",      "quit", img,  NULL};
    int status = -1;

    g_assert_true(g_spawn_sync(NULL, (char **)argv, NULL,
                               G_SPAWN_SEARCH_PATH |
                                   G_SPAWN_STDOUT_TO_DEV_NULL |
                                   G_SPAWN_STDERR_TO_DEV_NULL,
                               NULL, NULL, NULL, NULL, &status, NULL));
    return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

static void
test_idle(void)
{
    int fd = open(img, O_RDWR | O_CLOEXEC);
    g_autoptr(GError) err = NULL;
    bool in_use = true, busy = true;

    g_assert_true(image_lock_in_use(fd, &in_use, &err));
    g_assert_false(in_use);
    g_assert_true(image_lock_writer(fd, &busy, &err));
    g_assert_false(busy);
    close(fd);
}

static void
test_reader(void)
{
    struct holder h = hold(true);
    int fd = open(img, O_RDWR | O_CLOEXEC);
    g_autoptr(GError) err = NULL;
    bool busy = false;

    g_assert_true(image_lock_writer(fd, &busy, &err));
    g_assert_true(busy);
    release(&h);
    /* Refused, it kept no lock: the same open file may lock now. */
    g_assert_true(image_lock_writer(fd, &busy, &err));
    g_assert_false(busy);
    close(fd);
}

static void
test_writer(void)
{
    struct holder h = hold(false);
    int fd = open(img, O_RDWR | O_CLOEXEC);
    g_autoptr(GError) err = NULL;
    bool busy = false;

    g_assert_true(image_lock_writer(fd, &busy, &err));
    g_assert_true(busy);
    close(fd);
    release(&h);
}

static void
test_keeps_qemu_out(void)
{
    int fd = open(img, O_RDWR | O_CLOEXEC);
    g_autoptr(GError) err = NULL;
    bool busy = true;

    g_assert_true(qemu_opens());
    g_assert_true(image_lock_writer(fd, &busy, &err));
    g_assert_false(busy);
    g_assert_false(qemu_opens());
    close(fd);
    g_assert_true(qemu_opens());
}

int
main(int argc, char **argv)
{
    g_autofree char *dir = NULL;
    g_autofree char *qemu_io = g_find_program_in_path("qemu-io");
    g_autofree char *qemu_img = g_find_program_in_path("qemu-img");
    int status = -1, ret;

    g_test_init(&argc, &argv, NULL);
    if (!qemu_io || !qemu_img) {
        g_printerr("SKIP: qemu-io or qemu-img missing\n");
        return 77;
    }
    dir = g_dir_make_tmp("qbak-image-lock-XXXXXX", NULL);
    g_assert_nonnull(dir);
    img = g_build_filename(dir, "a.qcow2", NULL);
    const char *argv_img[] = {"qemu-img", "create", "-q", "-f",
                              "qcow2",    img,      "1M", NULL};
    g_assert_true(g_spawn_sync(NULL, (char **)argv_img, NULL,
                               G_SPAWN_SEARCH_PATH, NULL, NULL, NULL, NULL,
                               &status, NULL));
    g_assert_cmpint(status, ==, 0);

    g_test_add_func("/image-lock/idle", test_idle);
    g_test_add_func("/image-lock/qemu-reader", test_reader);
    g_test_add_func("/image-lock/qemu-writer", test_writer);
    g_test_add_func("/image-lock/keeps-qemu-out", test_keeps_qemu_out);
    ret = g_test_run();
    g_unlink(img);
    g_rmdir(dir);
    g_free(img);
    return ret;
}
