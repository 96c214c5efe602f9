/* A hostile guest agent for tests/test_guest_io.py: it takes the real agent's place (the test
 * installs it as /sbin/vmctl-agent and kills the real one; /init starts it) and answers the
 * host's file requests with listings and modes that no real file system would give:
 *
 *   STAT any path      -> a directory of mode 0xffffffff (all bits, file type bits included)
 *   LIST /dup          -> "twice" as a file, then "twice" as a directory
 *   LIST /dotdot       -> a file named ".."
 *   LIST /slash        -> a file named "../../../../tmp/escaped"
 *   LIST /deep...      -> one directory "d", however deep the host goes
 *   LIST /long         -> a file whose name has 300 bytes
 *   LIST /modes        -> a file "f" and a directory "d" of mode 0xffffffff, "odd" of kind 9
 *   LIST anything else -> nothing
 *   FREAD              -> mode 0xffffffff, then "hostile\n"
 *   POWEROFF           -> powers off, as the real agent does
 *
 * Built by the test with `gcc -static`; the frame format is vmctl/agentproto.py's.
 */
#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <unistd.h>

enum { T_PING = 0x01, T_FREAD = 0x0C, T_STAT = 0x0E, T_LIST = 0x0F, T_POWEROFF = 0x0B,
       T_READY = 0x40, T_PONG = 0x41, T_RESULT = 0x44, T_ERROR = 0x45, T_DATA = 0x03, T_EOF = 0x04 };

static int port;

static void put(int type, int stream, uint64_t id, const void *p, uint32_t len) {
    unsigned char h[16] = {0};
    memcpy(h, &len, 4);
    h[4] = (unsigned char)type;
    h[5] = (unsigned char)stream;
    memcpy(h + 8, &id, 8);
    if (write(port, h, 16) != 16 || (len && write(port, p, len) != (ssize_t)len)) exit(3);
}

static void get(void *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(port, (char *)buf + got, n - got);
        if (r < 0) exit(4);
        if (r == 0) usleep(50000); /* the host is not connected (yet) */
        got += r > 0 ? (size_t)r : 0;
    }
}

static size_t entry(char *out, int kind, uint32_t mode, const char *name) {
    out[0] = (char)kind;
    memcpy(out + 1, &mode, 4);
    strcpy(out + 5, name);
    return 5 + strlen(name) + 1;
}

int main(void) {
    char name[300] = "", line[128], path[512];
    DIR *d = opendir("/sys/class/virtio-ports");
    for (struct dirent *e; d && (e = readdir(d));) {
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        FILE *f = fopen(path, "r");
        if (f && fgets(line, sizeof line, f) && !strncmp(line, "org.vmctl.agent", 15))
            snprintf(name, sizeof name, "/dev/%s", e->d_name);
        if (f) fclose(f);
    }
    port = open(name, O_RDWR);
    if (port < 0) return 2;
    uint32_t version = 1;
    char ready[4 + 7];
    memcpy(ready, &version, 4);
    memcpy(ready + 4, "hostile", 7);
    put(T_READY, 0, 0, ready, sizeof ready);
    static char in[1 << 20], out[1 << 16];
    const uint32_t all = 0xffffffffu;
    for (;;) {
        unsigned char h[16];
        get(h, 16);
        uint32_t len;
        uint64_t id;
        memcpy(&len, h, 4);
        memcpy(&id, h + 8, 8);
        if (len >= sizeof in) return 5;
        get(in, len);
        in[len] = 0;
        size_t n = 0;
        switch (h[4]) {
        case T_PING:
            put(T_PONG, 0, id, NULL, 0);
            break;
        case T_STAT:
            out[0] = 1;
            memcpy(out + 1, &all, 4);
            memset(out + 5, 0, 8);
            put(T_RESULT, 0, id, out, 13);
            break;
        case T_LIST:
            if (!strcmp(in, "/dup")) {
                n += entry(out + n, 0, 0644, "twice");
                n += entry(out + n, 1, 0755, "twice");
            } else if (!strcmp(in, "/dotdot")) {
                n += entry(out + n, 0, 0644, "..");
            } else if (!strcmp(in, "/slash")) {
                n += entry(out + n, 0, 0644, "../../../../tmp/escaped");
            } else if (!strncmp(in, "/deep", 5)) {
                n += entry(out + n, 1, 0755, "d");
            } else if (!strcmp(in, "/long")) {
                char longname[301];
                memset(longname, 'x', 300);
                longname[300] = 0;
                n += entry(out + n, 0, 0644, longname);
            } else if (!strcmp(in, "/modes")) {
                n += entry(out + n, 0, all, "f");
                n += entry(out + n, 1, all, "d");
                n += entry(out + n, 9, 0644, "odd");
            }
            put(T_RESULT, 0, id, out, (uint32_t)n);
            break;
        case T_FREAD: {
            uint64_t size = 8;
            memcpy(out, &all, 4);
            memcpy(out + 4, &size, 8);
            put(T_RESULT, 0, id, out, 12);
            put(T_DATA, 1, id, "hostile\n", 8);
            put(T_EOF, 1, id, NULL, 0);
            break;
        }
        case T_POWEROFF:
            put(T_RESULT, 0, id, NULL, 0);
            sync();
            reboot(RB_POWER_OFF);
            return 0;
        default:
            break; /* CREDIT, CLOSE, ...: nothing to do */
        }
    }
}
