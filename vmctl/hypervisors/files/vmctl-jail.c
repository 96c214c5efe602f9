/* vmctl-jail: the jail's last step before QEMU. Started as root, ends as QEMU in its own
 * namespaces and uid. Compiled on first use by vmctl (vmctl/hypervisors/jailhelper.py); a small
 * program rather than a Python script because it runs once per sandbox start, on the critical
 * path (an interpreter took ~55 ms of a 250 ms clone start).
 *
 *   vmctl-jail [--uid N] [--gid N] [--groups G,G] [--unshare mount,pid,ipc,net]
 *              [--cgroup PROCS_FILE]... [--root DIR] [--bind SRC DST rw|ro]...
 *              [--env K=V]... [--memlock BYTES|-1] [--pdeathsig] [--exe PATH] -- QEMU ARGV...
 *
 * In order: die with the parent (--pdeathsig), join the cgroups, raise RLIMIT_MEMLOCK, unshare
 * the namespaces. With a PID namespace it forks: the child becomes PID 1 there and goes on;
 * this process stays outside as its parent, drops to the same uid, and exits the way QEMU
 * exits (same code, or same signal), so vmctl watches it as it would watch QEMU. The child
 * builds a minimal root (a read-only tmpfs with /usr, the /lib links, a few device nodes, a
 * private /tmp, /proc, and the --bind mounts), pivots into it, drops to the jail user, sets
 * the death signal again (a uid change clears it), sets no_new_privs and execs QEMU.
 * Any failure: one line "vmctl jail: ..." on stderr (qemu.log) and exit code 125.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_ITEMS 256

struct bind {
    const char *source, *target;
    int writable;
};

static const char *devices[] = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/kvm",
                                "/dev/net/tun", "/dev/vhost-net", "/dev/vhost-vsock", NULL};

static struct bind binds[MAX_ITEMS];
static int nbinds;
static const char *cgroup_files[MAX_ITEMS];
static int ncgroups;
static char *envs[MAX_ITEMS + 1];
static int nenvs;
static gid_t groups[64];
static int ngroups;
static pid_t child_pid;

static void fail(const char *what) {
    fprintf(stderr, "vmctl jail: %s\n", what);
    exit(125);
}

static void fail_errno(const char *what, const char *arg) {
    fprintf(stderr, "vmctl jail: %s %s: %s\n", what, arg ? arg : "", strerror(errno));
    exit(125);
}

static void check(int result, const char *what, const char *arg) {
    if (result != 0) fail_errno(what, arg);
}

static long number(const char *text, const char *option) {
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno || *end || end == text) {
        fprintf(stderr, "vmctl jail: %s wants a number, not '%s'\n", option, text);
        exit(125);
    }
    return value;
}

static void mount_or_die(const char *source, const char *target, const char *type, unsigned long flags,
                         const char *data) {
    if (mount(source, target, type, flags, data) != 0) fail_errno("mount on", target);
}

static void mkdir_parents(const char *path) {
    char buf[PATH_MAX];
    if (strlen(path) >= sizeof buf) fail("path too long");
    strcpy(buf, path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(buf, 0755) != 0 && errno != EEXIST) fail_errno("mkdir", buf);
        *p = '/';
    }
}

/* An empty directory or file at path, to mount like on. */
static void make_point(const char *path, const char *like) {
    struct stat st;
    mkdir_parents(path);
    if (stat(like, &st) == 0 && S_ISDIR(st.st_mode)) {
        if (mkdir(path, 0755) != 0 && errno != EEXIST) fail_errno("mkdir", path);
    } else if (access(path, F_OK) != 0) {
        int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
        if (fd < 0) fail_errno("create", path);
        close(fd);
    }
}

static void bind_into(const char *root, const char *source, const char *at, int writable) {
    char target[PATH_MAX];
    if (snprintf(target, sizeof target, "%s%s", root, at ? at : source) >= (int)sizeof target) fail("path too long");
    make_point(target, source);
    mount_or_die(source, target, NULL, MS_BIND, NULL);
    unsigned long flags = MS_BIND | MS_REMOUNT | MS_NOSUID | (writable ? 0 : MS_RDONLY);
    if (strncmp(source, "/dev/", 5) != 0) flags |= MS_NODEV;
    mount_or_die(NULL, target, NULL, flags, NULL);
}

static void build_root(const char *root, int with_proc) {
    static const char *top[] = {"bin", "lib", "lib64", "lib32", "libx32", "sbin", NULL};
    char path[PATH_MAX], link[PATH_MAX];
    struct stat st;
    mount_or_die(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL); /* nothing done here reaches the host */
    mount_or_die("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m");
    bind_into(root, "/usr", NULL, 0);
    for (int i = 0; top[i]; i++) { /* merged /usr: links; else bind */
        snprintf(path, sizeof path, "/%s", top[i]);
        if (lstat(path, &st) != 0) continue;
        if (S_ISLNK(st.st_mode)) {
            ssize_t n = readlink(path, link, sizeof link - 1);
            if (n < 0) fail_errno("readlink", path);
            link[n] = 0;
            char at[PATH_MAX];
            snprintf(at, sizeof at, "%s/%s", root, top[i]);
            check(symlink(link, at), "symlink", at);
        } else if (S_ISDIR(st.st_mode)) {
            bind_into(root, path, NULL, 0);
        }
    }
    if (stat("/etc/ld.so.cache", &st) == 0 && S_ISREG(st.st_mode)) bind_into(root, "/etc/ld.so.cache", NULL, 0);
    for (int i = 0; devices[i]; i++)
        if (access(devices[i], F_OK) == 0) bind_into(root, devices[i], NULL, 1);
    snprintf(path, sizeof path, "%s/tmp", root); /* before the binds: a run dir may be under /tmp */
    if (mkdir(path, 0755) != 0 && errno != EEXIST) fail_errno("mkdir", path);
    mount_or_die("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=4m");
    for (int i = 0; i < nbinds; i++) bind_into(root, binds[i].source, binds[i].target, binds[i].writable);
    if (with_proc) {
        snprintf(path, sizeof path, "%s/proc", root);
        if (mkdir(path, 0555) != 0 && errno != EEXIST) fail_errno("mkdir", path);
        mount_or_die("proc", path, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    }
    mount_or_die(NULL, root, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL); /* the tmpfs */
    check(chdir(root), "chdir", root);
    check((int)syscall(SYS_pivot_root, ".", "."), "pivot_root", root);
    check(umount2(".", MNT_DETACH), "umount the old root", NULL);
    check(chdir("/"), "chdir", "/");
}

static void drop(uid_t uid, gid_t gid) {
    check(setgroups((size_t)ngroups, groups), "setgroups", NULL);
    check(setresgid(gid, gid, gid), "setresgid", NULL);
    check(setresuid(uid, uid, uid), "setresuid", NULL);
}

static void pass_on(int sig) {
    kill(child_pid, sig);
}

/* Outside the PID namespace: wait for QEMU and exit as it did. */
static void wait_and_mirror(void) {
    int status;
    struct sigaction sa = {0};
    sa.sa_handler = pass_on; /* passed on, as if sent to QEMU */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    while (waitpid(child_pid, &status, 0) < 0)
        if (errno != EINTR) fail_errno("waitpid", NULL);
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        if (sig != SIGKILL && sig != SIGSTOP) signal(sig, SIG_DFL); /* those two cannot be set back */
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, sig);
        sigprocmask(SIG_UNBLOCK, &set, NULL);
        kill(getpid(), sig);
    }
    exit(WIFEXITED(status) ? WEXITSTATUS(status) : 1);
}

/* Only QEMU holds the sockets and disks: close every descriptor from 3 on but keep. */
static void close_others(int keep) {
    if (syscall(SYS_close_range, 3, keep - 1, 0) == 0 && syscall(SYS_close_range, keep + 1, ~0U, 0) == 0) return;
    DIR *dir = opendir("/proc/self/fd");
    if (!dir) return;
    int own = dirfd(dir);
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        int fd = atoi(entry->d_name);
        if (fd >= 3 && fd != keep && fd != own) close(fd);
    }
    closedir(dir);
}

static void set_death_signal(void) {
    check(prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "prctl", "PR_SET_PDEATHSIG");
}

int main(int argc, char **argv) {
    long uid = (long)geteuid(), gid = (long)getegid(), memlock = -2;
    int pdeathsig = 0, flags = 0, alive[2] = {-1, -1};
    const char *root = NULL, *exe = NULL, *unshare_kinds = "";
    int i = 1;
    for (; i < argc; i++) {
        const char *opt = argv[i];
        if (!strcmp(opt, "--")) { i++; break; }
        if (!strcmp(opt, "--pdeathsig")) { pdeathsig = 1; continue; }
        if (i + 1 >= argc) fail("an option lacks its value");
        const char *value = argv[++i];
        if (!strcmp(opt, "--uid")) uid = number(value, opt);
        else if (!strcmp(opt, "--gid")) gid = number(value, opt);
        else if (!strcmp(opt, "--groups")) {
            char copy[1024];
            snprintf(copy, sizeof copy, "%s", value);
            for (char *save, *g = strtok_r(copy, ",", &save); g && ngroups < 64; g = strtok_r(NULL, ",", &save))
                groups[ngroups++] = (gid_t)number(g, opt);
        } else if (!strcmp(opt, "--unshare")) unshare_kinds = value;
        else if (!strcmp(opt, "--cgroup") && ncgroups < MAX_ITEMS) cgroup_files[ncgroups++] = value;
        else if (!strcmp(opt, "--root")) root = value;
        else if (!strcmp(opt, "--env") && nenvs < MAX_ITEMS) envs[nenvs++] = (char *)value;
        else if (!strcmp(opt, "--memlock")) memlock = number(value, opt);
        else if (!strcmp(opt, "--exe")) exe = value;
        else if (!strcmp(opt, "--bind") && nbinds < MAX_ITEMS && i + 2 < argc) {
            binds[nbinds].source = value;
            binds[nbinds].target = argv[++i];
            binds[nbinds].writable = !strcmp(argv[++i], "rw");
            nbinds++;
        } else {
            fprintf(stderr, "vmctl jail: unknown option %s\n", opt);
            exit(125);
        }
    }
    if (i >= argc) fail("no command to run after --");
    char **command = argv + i;
    envs[nenvs] = NULL;
    if (strstr(unshare_kinds, "mount")) flags |= CLONE_NEWNS;
    if (strstr(unshare_kinds, "pid")) flags |= CLONE_NEWPID;
    if (strstr(unshare_kinds, "ipc")) flags |= CLONE_NEWIPC;
    if (strstr(unshare_kinds, "net")) flags |= CLONE_NEWNET;

    pid_t parent = getppid();
    if (pdeathsig) set_death_signal();
    for (int c = 0; c < ncgroups; c++) { /* QEMU inherits them */
        int fd = open(cgroup_files[c], O_WRONLY | O_CLOEXEC);
        if (fd < 0) fail_errno("open", cgroup_files[c]);
        char pid[32];
        int n = snprintf(pid, sizeof pid, "%d", (int)getpid());
        if (write(fd, pid, (size_t)n) != n) fail_errno("join", cgroup_files[c]);
        close(fd);
    }
    if (memlock != -2) { /* raised while still root; kept across the uid change */
        struct rlimit limit = {memlock < 0 ? RLIM_INFINITY : (rlim_t)memlock, memlock < 0 ? RLIM_INFINITY : (rlim_t)memlock};
        check(setrlimit(RLIMIT_MEMLOCK, &limit), "setrlimit", "RLIMIT_MEMLOCK");
    }
    if (flags) check(unshare(flags), "unshare", unshare_kinds);
    if (flags & CLONE_NEWPID) {
        check(pipe2(alive, O_CLOEXEC), "pipe", NULL); /* the child sees EOF once this process is gone */
        child_pid = fork();
        if (child_pid < 0) fail_errno("fork", NULL);
        if (child_pid > 0) {
            close(alive[0]);
            close_others(alive[1]);
            int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
            if (devnull >= 0) {
                dup2(devnull, 0);
                dup2(devnull, 1);
            }
            drop((uid_t)uid, (gid_t)gid);
            if (pdeathsig) { /* cleared by the uid change: set again, then check the parent */
                set_death_signal();
                if (getppid() != parent) {
                    kill(child_pid, SIGKILL);
                    exit(1);
                }
            }
            wait_and_mirror();
        }
        close(alive[1]);
    }
    if (root && (flags & CLONE_NEWNS)) {
        mode_t old = umask(022); /* the root's directories must be searchable; QEMU keeps its umask */
        build_root(root, (flags & CLONE_NEWPID) != 0);
        umask(old);
    }
    drop((uid_t)uid, (gid_t)gid);
    /* The death signal is set after the uid change, which clears it: QEMU dies with the outer
     * process (PID namespace), or with the controller (unless detached). */
    if ((flags & CLONE_NEWPID) || pdeathsig) {
        set_death_signal();
        if (alive[0] >= 0) { /* getppid() is 0 inside the new namespace: the pipe tells */
            struct pollfd p = {alive[0], POLLIN, 0};
            if (poll(&p, 1, 0) > 0) exit(1); /* the outer process died before the signal was set */
        } else if (getppid() != parent) {
            exit(1);
        }
    }
    if (alive[0] >= 0) close(alive[0]);
    check(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl", "PR_SET_NO_NEW_PRIVS");
    execve(exe ? exe : command[0], command, envs);
    fail_errno("exec", exe ? exe : command[0]);
    return 125;
}
