/* gdp-tapwire: the least a userspace dataplane over TAP devices can do per frame.
 *
 * Two TAP devices with the offloads geneve-dp asks for (virtio-net header, checksum,
 * TSO4/6), and one thread per direction that reads a frame from one and writes it,
 * unchanged, to the other: one read and one write per frame, no encapsulation, no
 * socket, no poll. Any TAP-based dataplane does at least this on each end, so the
 * bench runs TCP through it as a ceiling for all of them on this machine.
 *
 *   gdp-tapwire DEV0 DEV1
 *
 * Prints "ready" on stderr once both devices exist (the caller may then move DEV1 to
 * another namespace: the open file keeps it attached), relays until SIGTERM or SIGINT,
 * then prints {"frames": [0->1, 1->0], "bytes": [...], "errors": N} on stdout.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define VNET_HDR_LEN 12 /* struct virtio_net_hdr_v1 */
#define FRAME_MAX (VNET_HDR_LEN + 65536 + 64)

struct dir {
    int in, out;
    _Atomic uint64_t frames, bytes, errors;
};

static int open_tap(const char *name) {
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        perror("gdp-tapwire: /dev/net/tun");
        exit(1);
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    if (strlen(name) >= IFNAMSIZ) {
        fprintf(stderr, "gdp-tapwire: device name %s is longer than %d bytes\n", name,
                IFNAMSIZ - 1);
        exit(2);
    }
    strcpy(ifr.ifr_name, name);
    int hdr = VNET_HDR_LEN;
    if (ioctl(fd, TUNSETIFF, &ifr) < 0 || ioctl(fd, TUNSETVNETHDRSZ, &hdr) < 0 ||
        ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) < 0) {
        fprintf(stderr, "gdp-tapwire: %s: %s\n", name, strerror(errno));
        exit(1);
    }
    return fd;
}

static void *relay(void *arg) {
    struct dir *d = arg;
    static _Thread_local uint8_t buf[FRAME_MAX];
    for (;;) {
        ssize_t n = read(d->in, buf, sizeof(buf));
        if (n <= VNET_HDR_LEN) {
            if (n < 0 && errno != EINTR && errno != EAGAIN)
                d->errors++;
            continue;
        }
        if (write(d->out, buf, (size_t)n) != n) {
            d->errors++;
            continue;
        }
        d->frames++;
        d->bytes += (uint64_t)(n - VNET_HDR_LEN);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: gdp-tapwire DEV0 DEV1\n");
        return 2;
    }
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    pthread_sigmask(SIG_BLOCK, &stop, NULL); /* the relay threads inherit it */
    int fd0 = open_tap(argv[1]), fd1 = open_tap(argv[2]);
    static struct dir dirs[2];
    dirs[0].in = fd0;
    dirs[0].out = fd1;
    dirs[1].in = fd1;
    dirs[1].out = fd0;
    for (int i = 0; i < 2; i++) {
        pthread_t th;
        if (pthread_create(&th, NULL, relay, &dirs[i]) != 0) {
            fprintf(stderr, "gdp-tapwire: cannot start a relay thread\n");
            return 1;
        }
    }
    fprintf(stderr, "ready\n");
    int sig;
    sigwait(&stop, &sig);
    printf("{\"frames\": [%llu, %llu], \"bytes\": [%llu, %llu], \"errors\": %llu}\n",
           (unsigned long long)dirs[0].frames, (unsigned long long)dirs[1].frames,
           (unsigned long long)dirs[0].bytes, (unsigned long long)dirs[1].bytes,
           (unsigned long long)(dirs[0].errors + dirs[1].errors));
    fflush(stdout);
    _exit(0); /* the relay threads sit in read() */
}
