/* Attacks a builder tries from inside the sandbox (tests/build/test_sandbox_attacks.py): system
   calls busybox has no applet for.  Compiled statically by the test with the host's gcc. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/xattr.h>
#include <unistd.h>

static void report(const char *what, long rc) {
    if (rc < 0) printf("%s=%s\n", what, strerrorname_np(errno));
    else printf("%s=ok\n", what);
}

static int setid(const char *dir) {
    umask(0);
    if (chdir(dir) != 0) { perror("chdir"); return 2; }
    report("open_suid", open("o-suid", O_CREAT | O_WRONLY, 04755));
    report("open_sgid", open("o-sgid", O_CREAT | O_WRONLY, 02755));
    report("openat_suid", openat(AT_FDCWD, "oa-suid", O_CREAT | O_WRONLY, 04755));
    report("creat_suid", creat("c-suid", 04755));
    report("mknod_suid", mknod("m-suid", S_IFREG | 04755, 0));
    report("mknodat_sgid", mknodat(AT_FDCWD, "ma-sgid", S_IFREG | 02755, 0));
    int fd = open("plain", O_CREAT | O_WRONLY, 0755);
    report("open_plain", fd);
    report("chmod_suid", chmod("plain", 04755));
    report("chmod_sgid", chmod("plain", 02755));
    report("fchmod_suid", fchmod(fd, 04755));
    report("fchmodat_sgid", fchmodat(AT_FDCWD, "plain", 02755, 0));
#ifdef SYS_fchmodat2
    report("fchmodat2_suid", syscall(SYS_fchmodat2, AT_FDCWD, "plain", 04755, 0));
#else
    report("fchmodat2_suid", syscall(452, AT_FDCWD, "plain", 04755, 0));
#endif
    report("mkdir_sgid_then_file", mkdir("sgid-dir", 02777));
    report("chmod_dir_sgid", chmod(".", 02777));
    report("chmod_plain", chmod("plain", 0777));
    report("setxattr_user", setxattr("plain", "user.x", "a", 1, 0));
    report("setxattr_cap", setxattr("plain", "security.capability",
                                    "\x01\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00", 20, 0));
    report("lsetxattr_acl", lsetxattr("plain", "system.posix_acl_access", "\x02\x00\x00\x00", 4, 0));
    report("fsetxattr_user", fsetxattr(fd, "user.y", "b", 1, 0));
    struct stat st;
    stat("plain", &st);
    printf("plain_mode=%o\n", st.st_mode & 07777);
    return 0;
}

#define KEYCTL_GET_KEYRING_ID 0
#define KEYCTL_SEARCH 10
#define KEY_SPEC_SESSION_KEYRING -3
#define KEY_SPEC_USER_KEYRING -4
#define KEY_SPEC_USER_SESSION_KEYRING -5

static long search(long ring, const char *desc) {
    return syscall(SYS_keyctl, KEYCTL_SEARCH, ring, "user", desc, 0);
}

static int keys(const char *daemon_key, const char *planted) {
    printf("session=%ld\n", syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0));
    report("find_daemon_key", search(KEY_SPEC_SESSION_KEYRING, daemon_key));
    report("find_planted_session", search(KEY_SPEC_SESSION_KEYRING, planted));
    report("find_planted_user", search(KEY_SPEC_USER_KEYRING, planted));
    report("find_planted_user_session", search(KEY_SPEC_USER_SESSION_KEYRING, planted));
    report("plant_session", syscall(SYS_add_key, "user", planted, "x", 1, KEY_SPEC_SESSION_KEYRING));
    report("plant_user", syscall(SYS_add_key, "user", planted, "x", 1, KEY_SPEC_USER_KEYRING));
    report("plant_user_session",
           syscall(SYS_add_key, "user", planted, "x", 1, KEY_SPEC_USER_SESSION_KEYRING));
    return 0;
}

/* Open PATH read-write, write TEXT, and hand the descriptor to whoever listens on the
   abstract Unix socket NAME. */
static int sendfd(const char *path, const char *text, const char *name) {
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { perror("open"); return 2; }
    if (write(fd, text, strlen(text)) < 0) { perror("write"); return 2; }
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    size_t n = strlen(name);
    memcpy(addr.sun_path + 1, name, n);
    if (connect(s, (struct sockaddr *) &addr, offsetof(struct sockaddr_un, sun_path) + 1 + n) < 0) {
        fprintf(stderr, "connect=%s\n", strerrorname_np(errno));
        return 0;
    }
    char byte = 'x';
    struct iovec iov = { .iov_base = &byte, .iov_len = 1 };
    char cbuf[CMSG_SPACE(sizeof(int))];
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                          .msg_controllen = sizeof cbuf };
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
    fprintf(stderr, "sendmsg=%s\n", sendmsg(s, &msg, 0) < 0 ? strerrorname_np(errno) : "ok");
    return 0;
}

/* chmod(PATH, MODE) through the i386 system call interface (int $0x80), which the seccomp
   filter sees with AUDIT_ARCH_I386 and i386 numbers.  The path is copied to a static buffer:
   the binary is static and not PIE, so the buffer lies below 4 GiB. */
static char path32[4096];

static int chmod32(const char *path, const char *mode) {
#if defined(__x86_64__)
    long ret;
    strncpy(path32, path, sizeof path32 - 1);
    long m = strtol(mode, NULL, 8);
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(15L), "b"(path32), "c"(m) : "memory");
    if (ret < 0) {
        errno = (int) -ret;
        report("chmod32", -1);
    } else {
        report("chmod32", 0);
    }
    return 0;
#else
    (void) path; (void) mode;
    printf("chmod32=unsupported\n");
    return 0;
#endif
}

/* Leave a bound Unix socket file at PATH. */
static int mksock(const char *path) {
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    strncpy(addr.sun_path, path, sizeof addr.sun_path - 1);
    if (bind(s, (struct sockaddr *) &addr, sizeof addr) < 0) { perror("bind"); return 2; }
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "setid") == 0) return setid(argv[2]);
    if (argc >= 4 && strcmp(argv[1], "keys") == 0) return keys(argv[2], argv[3]);
    if (argc >= 5 && strcmp(argv[1], "sendfd") == 0) return sendfd(argv[2], argv[3], argv[4]);
    if (argc >= 3 && strcmp(argv[1], "mksock") == 0) return mksock(argv[2]);
    if (argc >= 4 && strcmp(argv[1], "chmod32") == 0) return chmod32(argv[2], argv[3]);
    fprintf(stderr, "usage: attack setid DIR | keys DAEMON-KEY PLANTED | sendfd PATH TEXT NAME | mksock PATH | chmod32 PATH MODE\n");
    return 2;
}
