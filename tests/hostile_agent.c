/* A hostile guest agent for the tests: it speaks vmctl's frame format (vmctl/agentproto.py) on
 * the agent's virtio-serial port and then breaks the protocol's rules on purpose.
 *
 * Built on the host with `gcc -static` by tests/hostile.py and run inside the default guest in
 * place of /sbin/vmctl-agent (which /init restarts whenever it exits). What it does is read from
 * /etc/hostile-mode, one word and a number:
 *
 *   stdout N   answer the next SPAWN with STARTED, then send N bytes of stdout for it, ignoring
 *              the credit the host granted (and also, with "stderr N", on stderr)
 *   fread N    answer the next FREAD with N bytes of the file, ignoring credit, and only then with
 *              the file's header
 *   pool N     a well-behaved agent for a pool's readiness check (READY; SPAWN answered with an
 *              empty output and exit 0), then N tenths of a second later a frame header of 1 GB
 *
 * Once it has the port it says "hostile agent listening" on the console, and "hostile agent
 * done" once it has sent everything: the tests wait for those lines instead of sleeping. Then it
 * reads and drops whatever the host sends until the host goes away, and stays (so that /init
 * does not start it again).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define HDR 16
#define CHUNK 65536
enum { T_SPAWN = 0x02, T_DATA = 0x03, T_EOF = 0x04, T_FREAD = 0x0C, T_READY = 0x40, T_STARTED = 0x42,
       T_EXIT = 0x43, T_RESULT = 0x44 };

static int port = -1;
static unsigned char payload[1 << 20];

static void say(const char *text) {
    int fd = open("/dev/console", O_WRONLY | O_NOCTTY);
    if (fd >= 0) {
        dprintf(fd, "%s\n", text);
        close(fd);
    }
}

static void write_all(const void *data, size_t len) {
    const char *p = data;
    while (len) {
        ssize_t n = write(port, p, len);
        if (n <= 0) {
            struct timespec ts = {0, 10 * 1000 * 1000};
            nanosleep(&ts, NULL); /* the host went away: what we send is dropped */
            if (n < 0) return;
            continue;
        }
        p += n, len -= (size_t)n;
    }
}

static void frame(uint8_t type, uint8_t stream, uint64_t id, const void *data, uint32_t len) {
    unsigned char h[HDR];
    memcpy(h, &len, 4);
    h[4] = type, h[5] = stream, h[6] = h[7] = 0;
    memcpy(h + 8, &id, 8);
    write_all(h, HDR);
    if (len) write_all(data, len);
}

static int read_all(void *data, size_t len) {
    char *p = data;
    while (len) {
        ssize_t n = read(port, p, len);
        if (n <= 0) return -1;
        p += n, len -= (size_t)n;
    }
    return 0;
}

/* The next frame the host sends: its type and id (the payload is kept in `payload`). */
static int next_frame(uint8_t *type, uint64_t *id) {
    unsigned char h[HDR];
    uint32_t len;
    if (read_all(h, HDR) < 0) return -1;
    memcpy(&len, h, 4);
    memcpy(id, h + 8, 8);
    *type = h[4];
    if (len > sizeof payload || read_all(payload, len) < 0) return -1;
    return 0;
}

static uint64_t wait_for(uint8_t wanted) {
    uint8_t type;
    uint64_t id;
    while (next_frame(&type, &id) == 0)
        if (type == wanted) return id;
    say("hostile agent: the host went away");
    for (;;) pause();
}

static void flood(uint64_t id, uint8_t stream, long long total) {
    static unsigned char chunk[CHUNK];
    memset(chunk, 'x', sizeof chunk);
    for (long long sent = 0; sent < total; sent += CHUNK) frame(T_DATA, stream, id, chunk, CHUNK);
}

int main(void) {
    char mode[32] = "";
    long long n = 0;
    FILE *f = fopen("/etc/hostile-mode", "r");
    if (!f || fscanf(f, "%31s %lld", mode, &n) != 2) {
        say("hostile agent: no /etc/hostile-mode");
        for (;;) pause();
    }
    DIR *d = opendir("/sys/class/virtio-ports");
    struct dirent *e;
    while (d && port < 0 && (e = readdir(d))) {
        char path[512], name[64] = "";
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        FILE *nf = fopen(path, "r");
        if (!nf) continue;
        if (fgets(name, sizeof name, nf) && strncmp(name, "org.vmctl.agent", 15) == 0) {
            snprintf(path, sizeof path, "/dev/%s", e->d_name);
            port = open(path, O_RDWR);
        }
        fclose(nf);
    }
    if (port < 0) {
        say("hostile agent: no agent port");
        for (;;) pause();
    }
    say("hostile agent listening");
    if (strcmp(mode, "stdout") == 0 || strcmp(mode, "stderr") == 0) {
        uint64_t id = wait_for(T_SPAWN);
        int32_t pid = 4242;
        frame(T_STARTED, 0, id, &pid, 4);
        flood(id, mode[3] == 'o' ? 1 : 2, n);
    } else if (strcmp(mode, "fread") == 0) {
        uint64_t id = wait_for(T_FREAD);
        unsigned char info[12] = {0xa4, 0x01, 0, 0};
        memcpy(info + 4, &n, 8);
        flood(id, 1, n); /* before the header: the host is not reading the file yet */
        frame(T_RESULT, 0, id, info, 12);
    } else if (strcmp(mode, "pool") == 0) {
        uint32_t version = 1;
        unsigned char ready[4 + 7];
        memcpy(ready, &version, 4);
        memcpy(ready + 4, "hostile", 7);
        frame(T_READY, 0, 0, ready, sizeof ready);
        uint64_t id = wait_for(T_SPAWN);
        int32_t pid = 4242;
        unsigned char exit_frame[5] = {0};
        frame(T_STARTED, 0, id, &pid, 4);
        frame(T_EOF, 1, id, NULL, 0);
        frame(T_EOF, 2, id, NULL, 0);
        frame(T_EXIT, 0, id, exit_frame, 5);
        struct timespec ts = {n / 10, (n % 10) * 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
        unsigned char huge[HDR] = {0, 0, 0, 0x40, T_DATA, 1};
        write_all(huge, HDR);
    }
    say("hostile agent done");
    uint8_t type;
    uint64_t id;
    while (next_frame(&type, &id) == 0) {
    }
    for (;;) pause();
}
