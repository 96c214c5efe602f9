/* vmctl guest agent: one static binary, one poll loop, many requests at once.
 *
 * It talks to the host over the virtio-serial port named org.vmctl.agent in length-prefixed
 * binary frames (vmctl/agentproto.py describes the format and the frame types):
 *
 *     u32 length | u8 type | u8 stream | u16 reserved | u64 id | payload
 *
 * Processes, file reads and file writes are sessions keyed by the host's id. Output goes to the
 * host only as far as the host granted credit for it (per stream), and the host sends stdin or
 * file data only as far as we granted; so memory stays bounded (a window per stream) however
 * much flows, and a process whose output nobody reads waits in its pipe instead of the port.
 *
 * The port allows one open at a time; while the host is not connected, poll reports POLLHUP
 * and reads return 0 at once, so we look again every 50 ms. When the host goes away every
 * session ends (processes are killed, temporary files removed): nobody could read them.
 *
 * Built by vmctl/guest/build.py with `gcc -static -O2`; started (and restarted) by /init.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PORT_NAME "org.vmctl.agent"
#define HDR 16
#define MAX_PAYLOAD (1u << 20)
#define CHUNK 65536
#define STDIN_WINDOW (256 * 1024)
#define OUT_HIGH (256 * 1024)
#define VERSION 1

enum {
    T_PING = 0x01, T_SPAWN, T_DATA, T_EOF, T_CREDIT, T_SIGNAL, T_CLOSE, T_QUERY, T_WAITDEV,
    T_WAITGONE, T_POWEROFF, T_FREAD, T_FWRITE, T_STAT, T_LIST, T_MKDIR,
    T_SOURCE = 0x20, T_SINK = 0x21, /* raw channel measurements (bench/files.py) */
    T_READY = 0x40, T_PONG, T_STARTED, T_EXIT, T_RESULT, T_ERROR,
};

enum { S_PROC, S_FREAD, S_FWRITE, S_WAIT, S_SOURCE, S_SINK };

struct sess {
    uint64_t id;
    int kind;
    int closed;               /* proc: the host let go; waiting to reap it */
    pid_t pid;
    int in_fd, out_fd[3];     /* out_fd[1], out_fd[2]: stdout, stderr */
    char *inbuf;
    size_t inlen;
    int in_eof;               /* the host ended stdin: close it once inbuf is written */
    uint32_t in_owed;         /* stdin / file bytes consumed, not yet credited back */
    int64_t credit[3];        /* output credit the host granted, per stream */
    int exited, code, timed_out;
    int64_t deadline;         /* ms, 0: none */
    int fd;                   /* fread / fwrite */
    uint32_t mode;
    char *path, *tmp;
    int failed;
    int gone;                 /* wait: WAITGONE */
    char bus[16], key[256];
    int64_t until, next_check;
    uint64_t remaining;       /* source */
    struct sess *next;
};

static struct sess *sessions;
static int port = -1;
static int test_mode;
static char *out;
static size_t out_len, out_off, out_cap;
static size_t ready_end;      /* out offset after READY; 0 once it went out */
static char *in;
static size_t in_len;
static int sigpipe_fds[2];
static char scratch[CHUNK];

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void die(const char *what) {
    fprintf(stderr, "vmctl-agent: %s: %s\n", what, strerror(errno));
    exit(2);
}

static size_t pending_out(void) { return out_len - out_off; }

static void emit2(int type, int stream, uint64_t id, const void *a, size_t alen, const void *b, size_t blen) {
    size_t need = HDR + alen + blen;
    if (out_off > 0 && out_off == out_len) out_off = out_len = 0;
    if (out_len + need > out_cap) {
        if (out_off > 0) {
            memmove(out, out + out_off, out_len - out_off);
            out_len -= out_off;
            if (ready_end) ready_end = ready_end > out_off ? ready_end - out_off : 0;
            out_off = 0;
        }
        if (out_len + need > out_cap) {
            size_t cap = out_cap ? out_cap : 1 << 16;
            while (cap < out_len + need) cap *= 2;
            out = realloc(out, cap);
            if (!out) die("realloc");
            out_cap = cap;
        }
    }
    uint32_t len = (uint32_t)(alen + blen);
    unsigned char *h = (unsigned char *)out + out_len;
    memcpy(h, &len, 4);   /* x86_64: little endian */
    h[4] = (unsigned char)type;
    h[5] = (unsigned char)stream;
    h[6] = h[7] = 0;
    memcpy(h + 8, &id, 8);
    if (alen) memcpy(h + HDR, a, alen);
    if (blen) memcpy(h + HDR + alen, b, blen);
    out_len += need;
}

static void emit(int type, int stream, uint64_t id, const void *p, size_t n) { emit2(type, stream, id, p, n, NULL, 0); }

static void emit_u32(int type, int stream, uint64_t id, uint32_t v) { emit(type, stream, id, &v, 4); }

static void emit_error(uint64_t id, int err, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if (n >= (int)sizeof msg) n = sizeof msg - 1;
    int32_t e = err;
    emit2(T_ERROR, 0, id, &e, 4, msg, (size_t)n);
}

static void flush_out(void) {
    while (pending_out() > 0) {
        ssize_t n = write(port, out + out_off, pending_out());
        if (n > 0) {
            out_off += (size_t)n;
            if (ready_end && out_off >= ready_end) ready_end = 0;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        return; /* EAGAIN (the host is slow or away) or an error: poll tells us more */
    }
    out_off = out_len = 0;
}

static struct sess *find(uint64_t id) {
    for (struct sess *s = sessions; s; s = s->next)
        if (s->id == id && !s->closed) return s;
    return NULL;
}

static struct sess *new_sess(uint64_t id, int kind) {
    struct sess *s = calloc(1, sizeof *s);
    if (!s) die("calloc");
    s->id = id;
    s->kind = kind;
    s->in_fd = s->out_fd[0] = s->out_fd[1] = s->out_fd[2] = s->fd = -1;
    s->next = sessions;
    sessions = s;
    return s;
}

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

static void free_sess(struct sess *s) {
    for (struct sess **p = &sessions; *p; p = &(*p)->next)
        if (*p == s) {
            *p = s->next;
            break;
        }
    close_fd(&s->in_fd);
    close_fd(&s->out_fd[1]);
    close_fd(&s->out_fd[2]);
    close_fd(&s->fd);
    if (s->tmp) unlink(s->tmp);
    free(s->inbuf);
    free(s->path);
    free(s->tmp);
    free(s);
}

/* The host is done with a session (CLOSE), or gone: kill, drop, forget. */
static void end_sess(struct sess *s) {
    if (s->kind == S_PROC && !s->exited) {
        kill(-s->pid, SIGKILL);
        kill(s->pid, SIGKILL);
        close_fd(&s->in_fd);
        close_fd(&s->out_fd[1]);
        close_fd(&s->out_fd[2]);
        free(s->inbuf);
        s->inbuf = NULL;
        s->closed = 1; /* reaped later */
        return;
    }
    free_sess(s);
}

static void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

/* -- processes ------------------------------------------------------------------------------ */

static void do_spawn(uint64_t id, const char *p, uint32_t len) {
    if (find(id)) return emit_error(id, EEXIST, "request id in use");
    if (len < 16) return emit_error(id, EINVAL, "short SPAWN request");
    uint32_t hdr[4];
    memcpy(hdr, p, 16);
    uint32_t timeout_ms = hdr[0], window = hdr[1], argc = hdr[2], envc = hdr[3];
    if (argc == 0 || argc > 100000 || envc > 100000) return emit_error(id, EINVAL, "bad argument counts");
    char **strs = calloc(argc + envc + 2, sizeof *strs);
    if (!strs) die("calloc");
    const char *q = p + 16, *end = p + len;
    for (uint32_t i = 0; i < argc + envc + 1; i++) {
        const char *nul = memchr(q, 0, (size_t)(end - q));
        if (!nul) {
            free(strs);
            return emit_error(id, EINVAL, "SPAWN strings not NUL-terminated");
        }
        strs[i] = (char *)q;
        q = nul + 1;
    }
    char *cwd = strs[argc + envc];
    int pin[2], pout[2], perr[2];
    int err;
    if (pipe2(pin, O_CLOEXEC) < 0) { err = errno; goto fail0; }
    if (pipe2(pout, O_CLOEXEC) < 0) { err = errno; goto fail1; }
    if (pipe2(perr, O_CLOEXEC) < 0) { err = errno; goto fail2; }
    pid_t pid = fork();
    err = errno;
    if (pid < 0) goto fail3;
    if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        signal(SIGCHLD, SIG_DFL);
        setsid();
        dup2(pin[0], 0);
        dup2(pout[1], 1);
        dup2(perr[1], 2);
        for (uint32_t i = 0; i < envc; i++) putenv(strs[argc + i]);
        if (cwd[0] && chdir(cwd) < 0) {
            dprintf(2, "vmctl-agent: cannot change directory to %s: %s\n", cwd, strerror(errno));
            _exit(126);
        }
        char **argv = strs; /* strs[argc] is the env's first entry or cwd: terminate argv */
        argv[argc] = NULL;
        execvp(argv[0], argv);
        int e = errno;
        dprintf(2, "vmctl-agent: cannot run %s: %s\n", argv[0], strerror(e));
        _exit(e == ENOENT ? 127 : 126);
    }
    free(strs);
    close(pin[0]);
    close(pout[1]);
    close(perr[1]);
    struct sess *s = new_sess(id, S_PROC);
    s->pid = pid;
    s->in_fd = pin[1];
    s->out_fd[1] = pout[0];
    s->out_fd[2] = perr[0];
    set_nonblock(s->in_fd);
    set_nonblock(s->out_fd[1]);
    set_nonblock(s->out_fd[2]);
    s->credit[1] = s->credit[2] = window;
    s->deadline = timeout_ms ? now_ms() + timeout_ms : 0;
    int32_t ipid = pid;
    emit(T_STARTED, 0, id, &ipid, 4);
    return;
fail3:
    close(perr[0]), close(perr[1]);
fail2:
    close(pout[0]), close(pout[1]);
fail1:
    close(pin[0]), close(pin[1]);
fail0:
    emit_error(id, err, "cannot start %s: %s", strs[0], strerror(err));
    free(strs);
}

static void stdin_broken(struct sess *s) {
    close_fd(&s->in_fd);
    free(s->inbuf);
    s->inbuf = NULL;
    s->inlen = 0;
    if (!s->in_eof) emit(T_EOF, 0, s->id, NULL, 0); /* the host's stdin.send() fails from now on */
    s->in_eof = 1;
}

static void pump_stdin(struct sess *s) {
    while (s->in_fd >= 0 && s->inlen > 0) {
        ssize_t n = write(s->in_fd, s->inbuf, s->inlen);
        if (n > 0) {
            memmove(s->inbuf, s->inbuf + n, s->inlen - (size_t)n);
            s->inlen -= (size_t)n;
            s->in_owed += (uint32_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && errno == EAGAIN) {
            break;
        } else {
            stdin_broken(s);
            return;
        }
    }
    if (s->in_fd >= 0 && s->inlen == 0 && s->in_eof) close_fd(&s->in_fd);
    if (s->in_owed && (s->in_owed >= STDIN_WINDOW / 4 || s->inlen == 0) && s->in_fd >= 0) {
        emit_u32(T_CREDIT, 0, s->id, s->in_owed);
        s->in_owed = 0;
    }
}

static void stdin_data(struct sess *s, const char *p, uint32_t len) {
    if (s->in_fd < 0 || s->in_eof) return; /* the process closed its stdin: discard */
    if (s->inlen + len > 2 * STDIN_WINDOW) return emit_error(s->id, EPROTO, "stdin beyond the granted credit");
    char *nb = realloc(s->inbuf, s->inlen + len);
    if (!nb) die("realloc");
    s->inbuf = nb;
    memcpy(s->inbuf + s->inlen, p, len);
    s->inlen += len;
    pump_stdin(s);
}

/* Read what the credit allows from stdout/stderr; true if the stream ended. */
static void pump_output(struct sess *s, int stream, int hup) {
    int *fd = &s->out_fd[stream];
    while (*fd >= 0 && s->credit[stream] > 0 && pending_out() < OUT_HIGH) {
        size_t want = s->credit[stream] < CHUNK ? (size_t)s->credit[stream] : CHUNK;
        ssize_t n = read(*fd, scratch, want);
        if (n > 0) {
            emit(T_DATA, stream, s->id, scratch, (size_t)n);
            s->credit[stream] -= n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        /* EAGAIN after the process exited: what is left belongs to a background child */
        if (n == 0 || (errno == EAGAIN ? s->exited : 1)) {
            close_fd(fd);
            emit(T_EOF, stream, s->id, NULL, 0);
        }
        return;
    }
    if (*fd >= 0 && hup && s->exited && s->credit[stream] > 0) {
        close_fd(fd);
        emit(T_EOF, stream, s->id, NULL, 0);
    }
}

static void maybe_finish(struct sess *s) {
    if (s->kind != S_PROC || !s->exited || s->closed) return;
    if (s->out_fd[1] >= 0 || s->out_fd[2] >= 0) return;
    unsigned char payload[5];
    int32_t code = s->code;
    memcpy(payload, &code, 4);
    payload[4] = (unsigned char)s->timed_out;
    emit(T_EXIT, 0, s->id, payload, 5);
    free_sess(s);
}

static void reap(void) {
    char b[64];
    while (read(sigpipe_fds[0], b, sizeof b) > 0) {
    }
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
        for (struct sess *s = sessions; s; s = s->next) {
            if (s->kind != S_PROC || s->pid != pid || s->exited) continue;
            s->exited = 1;
            s->code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
            if (s->closed) {
                free_sess(s);
            } else if (s->in_fd >= 0) {
                stdin_broken(s);
            }
            break;
        }
    }
}

static void on_sigchld(int sig) {
    (void)sig;
    int e = errno;
    if (write(sigpipe_fds[1], "c", 1) < 0) {
    }
    errno = e;
}

/* -- files ---------------------------------------------------------------------------------- */

static char *dup_path(const char *p, uint32_t len) {
    char *s = malloc(len + 1);
    if (!s) die("malloc");
    memcpy(s, p, len);
    s[len] = 0;
    return s;
}

static void do_fread(uint64_t id, const char *p, uint32_t len) {
    if (len < 5) return emit_error(id, EINVAL, "short FREAD request");
    uint32_t window;
    memcpy(&window, p, 4);
    char *path = dup_path(p + 4, len - 4);
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        emit_error(id, errno, "%s: %s", path, strerror(errno));
        if (fd >= 0) close(fd);
        free(path);
        return;
    }
    if (!S_ISREG(st.st_mode)) {
        int e = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
        emit_error(id, e, "%s: %s", path, S_ISDIR(st.st_mode) ? strerror(e) : "not a regular file");
        close(fd);
        free(path);
        return;
    }
    struct sess *s = new_sess(id, S_FREAD);
    s->fd = fd;
    s->path = path;
    s->credit[1] = window;
    unsigned char info[12];
    uint32_t mode = st.st_mode & 07777;
    uint64_t size = (uint64_t)st.st_size;
    memcpy(info, &mode, 4);
    memcpy(info + 4, &size, 8);
    emit(T_RESULT, 0, id, info, 12);
}

/* A file being read: as much as credit and the port allow. True if more could be read now. */
static int pump_fread(struct sess *s) {
    while (s->credit[1] > 0 && pending_out() < OUT_HIGH) {
        size_t want = s->credit[1] < CHUNK ? (size_t)s->credit[1] : CHUNK;
        ssize_t n = read(s->fd, scratch, want);
        if (n > 0) {
            emit(T_DATA, 1, s->id, scratch, (size_t)n);
            s->credit[1] -= n;
        } else if (n == 0) {
            emit(T_EOF, 1, s->id, NULL, 0);
            free_sess(s);
            return 0;
        } else if (errno != EINTR) {
            emit_error(s->id, errno, "%s: %s", s->path, strerror(errno));
            free_sess(s);
            return 0;
        }
    }
    return s->credit[1] > 0;
}

static void do_fwrite(uint64_t id, const char *p, uint32_t len) {
    if (len < 5) return emit_error(id, EINVAL, "short FWRITE request");
    struct sess *s = new_sess(id, S_FWRITE);
    memcpy(&s->mode, p, 4);
    s->path = dup_path(p + 4, len - 4);
    const char *slash = strrchr(s->path, '/');
    int dirlen = slash ? (int)(slash - s->path + 1) : 0;
    if (asprintf(&s->tmp, "%.*s.%s.vmctl-%016llx", dirlen, s->path, slash ? slash + 1 : s->path,
                 (unsigned long long)id) < 0)
        die("asprintf");
    s->fd = open(s->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (s->fd < 0) {
        emit_error(id, errno, "%s: %s", s->path, strerror(errno));
        free(s->tmp);
        s->tmp = NULL;
        free_sess(s);
        return;
    }
    emit_u32(T_CREDIT, 0, id, STDIN_WINDOW);
}

static void fwrite_fail(struct sess *s, int err) {
    emit_error(s->id, err, "%s: %s", s->path, strerror(err));
    free_sess(s); /* unlinks the temporary file */
}

static void fwrite_data(struct sess *s, const char *p, uint32_t len) {
    while (len > 0) {
        ssize_t n = write(s->fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return fwrite_fail(s, n < 0 ? errno : ENOSPC);
        p += n;
        len -= (uint32_t)n;
        s->in_owed += (uint32_t)n;
    }
    if (s->in_owed >= STDIN_WINDOW / 4) {
        emit_u32(T_CREDIT, 0, s->id, s->in_owed);
        s->in_owed = 0;
    }
}

static void fwrite_end(struct sess *s) {
    if (fchmod(s->fd, s->mode & 07777) < 0) return fwrite_fail(s, errno);
    int fd = s->fd;
    s->fd = -1;
    if (close(fd) < 0) return fwrite_fail(s, errno);
    if (rename(s->tmp, s->path) < 0) return fwrite_fail(s, errno);
    free(s->tmp);
    s->tmp = NULL;
    emit(T_RESULT, 0, s->id, NULL, 0);
    free_sess(s);
}

static void do_stat(uint64_t id, const char *p, uint32_t len) {
    char *path = dup_path(p, len);
    struct stat st;
    if (stat(path, &st) < 0) {
        emit_error(id, errno, "%s: %s", path, strerror(errno));
    } else {
        unsigned char r[13];
        uint32_t mode = st.st_mode & 07777;
        uint64_t size = (uint64_t)st.st_size;
        r[0] = S_ISREG(st.st_mode) ? 0 : S_ISDIR(st.st_mode) ? 1 : 2;
        memcpy(r + 1, &mode, 4);
        memcpy(r + 5, &size, 8);
        emit(T_RESULT, 0, id, r, 13);
    }
    free(path);
}

static void do_list(uint64_t id, const char *p, uint32_t len) {
    char *path = dup_path(p, len);
    DIR *d = opendir(path);
    if (!d) {
        emit_error(id, errno, "%s: %s", path, strerror(errno));
        free(path);
        return;
    }
    char *buf = malloc(MAX_PAYLOAD);
    if (!buf) die("malloc");
    size_t n = 0;
    struct dirent *e;
    int err = 0;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        struct stat st;
        if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0) continue;
        size_t nl = strlen(e->d_name);
        if (n + 5 + nl + 1 > MAX_PAYLOAD) {
            err = E2BIG;
            break;
        }
        buf[n] = (char)(S_ISREG(st.st_mode) ? 0 : S_ISDIR(st.st_mode) ? 1 : 2);
        uint32_t mode = st.st_mode & 07777;
        memcpy(buf + n + 1, &mode, 4);
        memcpy(buf + n + 5, e->d_name, nl + 1);
        n += 5 + nl + 1;
    }
    closedir(d);
    if (err) emit_error(id, err, "%s: too many entries for one listing", path);
    else emit(T_RESULT, 0, id, buf, n);
    free(buf);
    free(path);
}

static void do_mkdir(uint64_t id, const char *p, uint32_t len) {
    if (len < 5) return emit_error(id, EINVAL, "short MKDIR request");
    uint32_t mode;
    memcpy(&mode, p, 4);
    char *path = dup_path(p + 4, len - 4);
    struct stat st;
    /* An upload merges into a directory that exists (it keeps its mode; so does the guest's
     * /tmp when a tree lands there); only a directory made here gets the host's mode. */
    if (mkdir(path, 0700) == 0) {
        if (chmod(path, mode & 07777) < 0) emit_error(id, errno, "%s: %s", path, strerror(errno));
        else emit(T_RESULT, 0, id, NULL, 0);
    } else if (errno != EEXIST) {
        emit_error(id, errno, "%s: %s", path, strerror(errno));
    } else if (stat(path, &st) < 0 || !S_ISDIR(st.st_mode)) {
        emit_error(id, ENOTDIR, "%s: exists and is not a directory", path);
    } else {
        emit(T_RESULT, 0, id, NULL, 0);
    }
    free(path);
}

/* -- queries and device waits --------------------------------------------------------------- */

static int read_line(const char *path, char *buf, size_t cap) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, cap - 1);
    close(fd);
    if (n < 0) return -1;
    buf[n] = 0;
    char *nl = strchr(buf, '\n');
    if (nl) *nl = 0;
    return 0;
}

static void do_query(uint64_t id, const char *p, uint32_t len) {
    static char text[65536];
    size_t n = 0;
    char path[512], a[256], b[256];
    if (len == 5 && !memcmp(p, "block", 5)) {
        DIR *d = opendir("/sys/block");
        struct dirent *e;
        while (d && (e = readdir(d))) {
            if (e->d_name[0] == '.') continue;
            snprintf(path, sizeof path, "/sys/block/%s/device", e->d_name);
            if (access(path, F_OK) < 0) continue; /* real disks only, no loop or ram devices */
            snprintf(path, sizeof path, "/sys/block/%s/size", e->d_name);
            if (read_line(path, a, sizeof a) < 0) continue;
            snprintf(path, sizeof path, "/sys/block/%s/serial", e->d_name);
            if (read_line(path, b, sizeof b) < 0) b[0] = 0;
            int w = snprintf(text + n, sizeof text - n, "%s %s %s\n", e->d_name, a, b);
            if (w > 0 && (size_t)w < sizeof text - n) n += (size_t)w;
        }
        if (d) closedir(d);
    } else if (len == 4 && !memcmp(p, "cpus", 4)) {
        if (read_line("/sys/devices/system/cpu/online", text, sizeof text) < 0)
            return emit_error(id, errno, "cpus: %s", strerror(errno));
        n = strlen(text);
    } else if (len == 6 && !memcmp(p, "memory", 6)) {
        FILE *f = fopen("/proc/meminfo", "re");
        if (!f) return emit_error(id, errno, "memory: %s", strerror(errno));
        char line[256];
        while (fgets(line, sizeof line, f)) {
            if (strncmp(line, "MemTotal:", 9) && strncmp(line, "MemFree:", 8) && strncmp(line, "MemAvailable:", 13))
                continue;
            size_t l = strlen(line);
            if (n + l < sizeof text) memcpy(text + n, line, l), n += l;
        }
        fclose(f);
    } else {
        return emit_error(id, EINVAL, "unknown query %.*s", (int)(len > 64 ? 64 : len), p);
    }
    emit(T_RESULT, 0, id, text, n);
}

/* The guest's name for a disk or NIC: virtio disks by serial, SCSI disks by target, NICs by MAC. */
static int find_dev(const char *bus, const char *key, char *name, size_t cap) {
    char path[600], val[256];
    struct dirent *e;
    int found = 0;
    if (!strcmp(bus, "net") || !strcmp(bus, "virtio")) {
        int net = !strcmp(bus, "net");
        DIR *d = opendir(net ? "/sys/class/net" : "/sys/block");
        while (d && !found && (e = readdir(d))) {
            if (e->d_name[0] == '.' || (!net && strncmp(e->d_name, "vd", 2))) continue;
            snprintf(path, sizeof path, net ? "/sys/class/net/%s/address" : "/sys/block/%s/serial", e->d_name);
            if (read_line(path, val, sizeof val) == 0 && !strcmp(val, key)) {
                snprintf(name, cap, "%s", e->d_name);
                found = 1;
            }
        }
        if (d) closedir(d);
    } else if (!strcmp(bus, "scsi")) {
        DIR *d = opendir("/sys/class/scsi_disk");
        while (d && !found && (e = readdir(d))) {
            unsigned h, c, t, l;
            char tail;
            if (sscanf(e->d_name, "%u:%u:%u:%u%c", &h, &c, &t, &l, &tail) != 4 || c != 0 || l != 0) continue;
            snprintf(val, sizeof val, "%u", t);
            if (strcmp(val, key)) continue;
            snprintf(path, sizeof path, "/sys/class/scsi_disk/%s/device/block", e->d_name);
            DIR *b = opendir(path);
            struct dirent *f;
            while (b && !found && (f = readdir(b)))
                if (f->d_name[0] != '.') snprintf(name, cap, "%s", f->d_name), found = 1;
            if (b) closedir(b);
        }
        if (d) closedir(d);
    }
    return found;
}

/* true once the wait is answered */
static int check_wait(struct sess *s, int64_t now) {
    char name[256] = "";
    int found = find_dev(s->bus, s->key, name, sizeof name);
    unsigned char ok = s->gone ? !found : found;
    if (!ok && now < s->until) {
        s->next_check = now + 100;
        return 0;
    }
    emit2(T_RESULT, 0, s->id, &ok, 1, s->gone ? "" : name, s->gone || !ok ? 0 : strlen(name));
    free_sess(s);
    return 1;
}

static void do_wait(uint64_t id, const char *p, uint32_t len, int gone) {
    if (len < 6) return emit_error(id, EINVAL, "short WAIT request");
    uint32_t tenths;
    memcpy(&tenths, p, 4);
    const char *bus = p + 4;
    const char *nul = memchr(bus, 0, len - 4);
    size_t keylen = nul ? len - 4 - (size_t)(nul - bus) - 1 : 0;
    if (!nul || (size_t)(nul - bus) >= 16 || keylen >= 256) return emit_error(id, EINVAL, "bad WAIT request");
    struct sess *s = new_sess(id, S_WAIT);
    s->gone = gone;
    memcpy(s->bus, bus, (size_t)(nul - bus) + 1);
    memcpy(s->key, nul + 1, keylen);
    s->key[keylen] = 0;
    int64_t now = now_ms();
    s->until = now + (int64_t)tenths * 100;
    check_wait(s, now);
}

/* -- the port ------------------------------------------------------------------------------- */

static void poweroff(uint64_t id) {
    emit(T_RESULT, 0, id, NULL, 0);
    for (int i = 0; i < 20 && pending_out() > 0; i++) {
        flush_out();
        if (pending_out() > 0) usleep(10000);
    }
    sync();
    if (test_mode) exit(0);
    usleep(100000);
    reboot(RB_POWER_OFF);
    die("reboot");
}

static void handle(int type, int stream, uint64_t id, const char *p, uint32_t len) {
    struct sess *s;
    switch (type) {
    case T_PING: emit(T_PONG, 0, id, NULL, 0); break;
    case T_SPAWN: do_spawn(id, p, len); break;
    case T_DATA:
        if (!(s = find(id))) break;
        if (s->kind == S_PROC && stream == 0) stdin_data(s, p, len);
        else if (s->kind == S_FWRITE) fwrite_data(s, p, len);
        else if (s->kind == S_SINK) {
            s->remaining -= s->remaining < len ? s->remaining : len;
            emit_u32(T_CREDIT, 0, id, len);
        }
        break;
    case T_EOF:
        if (!(s = find(id))) break;
        if (s->kind == S_PROC && !s->in_eof) {
            s->in_eof = 1;
            pump_stdin(s);
        } else if (s->kind == S_FWRITE) {
            fwrite_end(s);
        } else if (s->kind == S_SINK) {
            emit(T_RESULT, 0, id, NULL, 0);
            free_sess(s);
        }
        break;
    case T_CREDIT: {
        if (!(s = find(id)) || len != 4 || stream < 1 || stream > 2) break;
        uint32_t more;
        memcpy(&more, p, 4);
        s->credit[stream] += more;
        break;
    }
    case T_SIGNAL: {
        if (!(s = find(id)) || s->kind != S_PROC || len != 4) break;
        int32_t sig;
        memcpy(&sig, p, 4);
        if (!s->exited && kill(s->pid, sig) < 0) emit_error(id, errno, "kill: %s", strerror(errno));
        break;
    }
    case T_CLOSE:
        if ((s = find(id))) end_sess(s);
        break;
    case T_QUERY: do_query(id, p, len); break;
    case T_WAITDEV: do_wait(id, p, len, 0); break;
    case T_WAITGONE: do_wait(id, p, len, 1); break;
    case T_POWEROFF: poweroff(id); break;
    case T_FREAD: do_fread(id, p, len); break;
    case T_FWRITE: do_fwrite(id, p, len); break;
    case T_STAT: do_stat(id, p, len); break;
    case T_LIST: do_list(id, p, len); break;
    case T_MKDIR: do_mkdir(id, p, len); break;
    case T_SOURCE:
        if (len != 8) return emit_error(id, EINVAL, "bad SOURCE request");
        s = new_sess(id, S_SOURCE);
        memcpy(&s->remaining, p, 8);
        break;
    case T_SINK:
        s = new_sess(id, S_SINK);
        emit_u32(T_CREDIT, 0, id, STDIN_WINDOW);
        break;
    default: emit_error(id, EINVAL, "unknown request type 0x%02x", type);
    }
}

static void parse_input(void) {
    size_t pos = 0;
    while (in_len - pos >= HDR) {
        uint32_t len;
        uint64_t id;
        memcpy(&len, in + pos, 4);
        memcpy(&id, in + pos + 8, 8);
        if (len > MAX_PAYLOAD) {
            fprintf(stderr, "vmctl-agent: the host sent a frame of %u bytes; starting over\n", len);
            exit(3); /* no way to find the next frame: init restarts us, the host sees READY */
        }
        if (in_len - pos < HDR + len) break;
        handle((unsigned char)in[pos + 4], (unsigned char)in[pos + 5], id, in + pos + HDR, len);
        pos += HDR + len;
    }
    memmove(in, in + pos, in_len - pos);
    in_len -= pos;
}

static void host_gone(void) {
    for (struct sess *s = sessions, *next; s; s = next) {
        next = s->next;
        if (!s->closed) end_sess(s); /* processes stay listed (closed) until reaped */
    }
    in_len = 0;
    if (!ready_end) out_off = out_len = 0; /* nobody will read it; READY waits for the host */
    if (test_mode) exit(0);
}

static int open_port(char *name, size_t cap) {
    const char *fd_env = getenv("VMCTL_AGENT_FD");
    if (fd_env) { /* tests: a socket handed over by the host */
        test_mode = 1;
        snprintf(name, cap, "fd %s", fd_env);
        return atoi(fd_env);
    }
    DIR *d = opendir("/sys/class/virtio-ports");
    struct dirent *e;
    char path[512], val[128];
    int fd = -1;
    while (d && (e = readdir(d))) {
        if (strncmp(e->d_name, "vport", 5)) continue;
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        if (read_line(path, val, sizeof val) == 0 && !strcmp(val, PORT_NAME)) {
            snprintf(name, cap, "/dev/%s", e->d_name);
            fd = open(name, O_RDWR | O_CLOEXEC);
            if (fd < 0) die(name);
        }
    }
    if (d) closedir(d);
    return fd;
}

int main(void) {
    char name[300];
    port = open_port(name, sizeof name);
    if (port < 0) {
        fprintf(stderr, "vmctl-agent: no virtio port named %s\n", PORT_NAME);
        sleep(1);
        return 1;
    }
    set_nonblock(port);
    fcntl(port, F_SETFD, FD_CLOEXEC);
    signal(SIGPIPE, SIG_IGN);
    if (pipe2(sigpipe_fds, O_CLOEXEC | O_NONBLOCK) < 0) die("pipe");
    struct sigaction sa = {0};
    sa.sa_handler = on_sigchld;
    sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    sigaction(SIGCHLD, &sa, NULL);
    in = malloc(HDR + MAX_PAYLOAD + CHUNK);
    if (!in) die("malloc");

    char boot_id[64] = "unknown";
    read_line("/proc/sys/kernel/random/boot_id", boot_id, sizeof boot_id);
    uint32_t version = VERSION;
    emit2(T_READY, 0, 0, &version, 4, boot_id, strlen(boot_id));
    ready_end = out_len;
    printf("vmctl-agent: ready on %s\n", name);
    fflush(stdout);

    struct pollfd *pfd = NULL;
    struct sess **owner = NULL;
    int *what = NULL;
    size_t pcap = 0;
    int64_t port_retry = 0; /* while the host is away: when to look again */
    for (;;) {
        size_t count = 0;
        for (struct sess *s = sessions; s; s = s->next) count++;
        if (pcap < count * 3 + 2) {
            pcap = count * 3 + 16;
            pfd = realloc(pfd, pcap * sizeof *pfd);
            owner = realloc(owner, pcap * sizeof *owner);
            what = realloc(what, pcap * sizeof *what);
            if (!pfd || !owner || !what) die("realloc");
        }
        int64_t now = now_ms();
        int timeout = -1;
        size_t n = 0;
        pfd[n] = (struct pollfd){sigpipe_fds[0], POLLIN, 0};
        owner[n] = NULL, what[n++] = -1;
        if (now >= port_retry) {
            pfd[n] = (struct pollfd){port, (short)(POLLIN | (pending_out() ? POLLOUT : 0)), 0};
            owner[n] = NULL, what[n++] = -2;
        } else {
            timeout = (int)(port_retry - now);
        }
        int room = pending_out() < OUT_HIGH;
        for (struct sess *s = sessions; s; s = s->next) {
            int64_t due = -1;
            if (s->kind == S_PROC && !s->closed) {
                if (s->in_fd >= 0 && s->inlen > 0) {
                    pfd[n] = (struct pollfd){s->in_fd, POLLOUT, 0};
                    owner[n] = s, what[n++] = 0;
                }
                for (int k = 1; k <= 2; k++)
                    if (s->out_fd[k] >= 0 && s->credit[k] > 0 && room) {
                        pfd[n] = (struct pollfd){s->out_fd[k], POLLIN, 0};
                        owner[n] = s, what[n++] = k;
                        if (s->exited) due = now; /* drain what is left, then end */
                    }
                if (s->deadline && !s->exited) due = s->deadline;
            } else if ((s->kind == S_FREAD && s->credit[1] > 0 && room) || (s->kind == S_SOURCE && room)) {
                due = now;
            } else if (s->kind == S_WAIT) {
                due = s->next_check;
            }
            if (due >= 0) {
                int t = due <= now ? 0 : (int)(due - now);
                if (timeout < 0 || t < timeout) timeout = t;
            }
        }
        if (poll(pfd, n, timeout) < 0 && errno != EINTR) die("poll");
        now = now_ms();
        for (size_t i = 0; i < n; i++) {
            short re = pfd[i].revents;
            if (what[i] == -1 && re) {
                reap();
            } else if (what[i] == -2) {
                if (re & POLLIN) {
                    ssize_t r = read(port, in + in_len, HDR + MAX_PAYLOAD + CHUNK - in_len);
                    if (r > 0) {
                        in_len += (size_t)r;
                        parse_input();
                    } else if (r == 0) {
                        host_gone();
                        port_retry = now + 50;
                    }
                } else if (re & (POLLHUP | POLLERR)) {
                    host_gone();
                    port_retry = now + 50;
                }
                if (re & POLLOUT) flush_out();
            }
        }
        for (size_t i = 0; i < n; i++) {
            struct sess *s = owner[i];
            if (!s || !pfd[i].revents) continue;
            int alive = 0; /* the session may have ended while handling an earlier fd */
            for (struct sess *t = sessions; t; t = t->next) alive |= t == s;
            if (!alive || s->closed) continue;
            if (what[i] == 0) pump_stdin(s);
            else pump_output(s, what[i], pfd[i].revents & (POLLHUP | POLLERR));
        }
        for (struct sess *s = sessions, *next; s; s = next) {
            next = s->next;
            if (s->kind == S_PROC && !s->closed) {
                if (s->deadline && !s->exited && now >= s->deadline) {
                    s->timed_out = 1;
                    kill(-s->pid, SIGKILL);
                    kill(s->pid, SIGKILL);
                    s->deadline = 0;
                }
                if (s->exited) {
                    pump_output(s, 1, 0);
                    pump_output(s, 2, 0);
                }
                maybe_finish(s);
            } else if (s->kind == S_FREAD) {
                pump_fread(s);
            } else if (s->kind == S_WAIT && now >= s->next_check) {
                check_wait(s, now);
            } else if (s->kind == S_SOURCE) {
                while (s->remaining > 0 && pending_out() < OUT_HIGH) {
                    size_t k = s->remaining < CHUNK ? (size_t)s->remaining : CHUNK;
                    memset(scratch, 0, k);
                    emit(T_DATA, 1, s->id, scratch, k);
                    s->remaining -= k;
                }
                if (s->remaining == 0) {
                    emit(T_EOF, 1, s->id, NULL, 0);
                    free_sess(s);
                }
            }
        }
        if (pending_out()) flush_out();
    }
}
