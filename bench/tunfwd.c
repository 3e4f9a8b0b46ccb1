/* gdp-tunfwd: the simplest userspace GENEVE forwarder, one packet per system call.
 *
 * A TUN device (IP packets, no offloads) and a UDP socket on port 6081, and one thread
 * per direction: read one packet from the device, put an 8-byte GENEVE header (RFC
 * 8926, no options, protocol type the packet's EtherType) in front and send it to the
 * peer; receive one datagram, check its header and VNI, write the inner packet to the
 * device. No batching, no poll, no offloads, nothing held: each packet is on its way as
 * soon as its thread wakes up. Sparse-traffic latency of any userspace dataplane should
 * be no worse than this.
 *
 *   gdp-tunfwd DEV LOCAL_IPV4 REMOTE_IPV4 VNI
 *
 * Prints "ready" on stderr once the device and the socket exist, forwards until
 * SIGTERM or SIGINT, then prints {"packets": [out, in], "errors": N, "dropped": N} on
 * stdout (dropped: datagrams that are not GENEVE for this VNI).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#define GENEVE_PORT 6081
#define GENEVE_HDR_LEN 8
#define PKT_MAX 65536

static int tun_fd, udp_fd;
static uint32_t vni;
static _Atomic uint64_t out_pkts, in_pkts, errors, dropped;

static void die(const char *what) {
    fprintf(stderr, "gdp-tunfwd: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* Device -> peer: one read, one send. */
static void *encap(void *arg) {
    (void)arg;
    static _Thread_local uint8_t buf[GENEVE_HDR_LEN + PKT_MAX];
    for (;;) {
        ssize_t n = read(tun_fd, buf + GENEVE_HDR_LEN, PKT_MAX);
        if (n <= 0) {
            if (n < 0 && errno != EINTR)
                errors++;
            continue;
        }
        uint16_t ethertype = (buf[GENEVE_HDR_LEN] >> 4) == 6 ? 0x86DD : 0x0800;
        buf[0] = 0; /* version 0, no options */
        buf[1] = 0; /* no O or C bit */
        buf[2] = (uint8_t)(ethertype >> 8);
        buf[3] = (uint8_t)ethertype;
        buf[4] = (uint8_t)(vni >> 16);
        buf[5] = (uint8_t)(vni >> 8);
        buf[6] = (uint8_t)vni;
        buf[7] = 0;
        if (send(udp_fd, buf, (size_t)n + GENEVE_HDR_LEN, 0) < 0) {
            errors++;
            continue;
        }
        out_pkts++;
    }
    return NULL;
}

/* Peer -> device: one recv, one write. */
static void *decap(void *arg) {
    (void)arg;
    static _Thread_local uint8_t buf[GENEVE_HDR_LEN + 256 + PKT_MAX];
    for (;;) {
        ssize_t n = recv(udp_fd, buf, sizeof(buf), 0);
        if (n < 0) {
            if (errno != EINTR)
                errors++;
            continue;
        }
        size_t hdr = GENEVE_HDR_LEN + 4u * (buf[0] & 0x3f);
        uint32_t got = (uint32_t)buf[4] << 16 | (uint32_t)buf[5] << 8 | buf[6];
        if (n < GENEVE_HDR_LEN || (size_t)n <= hdr || (buf[0] >> 6) != 0 || got != vni) {
            dropped++;
            continue;
        }
        if (write(tun_fd, buf + hdr, (size_t)n - hdr) < 0) {
            errors++;
            continue;
        }
        in_pkts++;
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: gdp-tunfwd DEV LOCAL_IPV4 REMOTE_IPV4 VNI\n");
        return 2;
    }
    struct sockaddr_in local = {.sin_family = AF_INET, .sin_port = htons(GENEVE_PORT)};
    struct sockaddr_in remote = local;
    char *end;
    unsigned long v = strtoul(argv[4], &end, 10);
    if (strlen(argv[1]) >= IFNAMSIZ || inet_pton(AF_INET, argv[2], &local.sin_addr) != 1 ||
        inet_pton(AF_INET, argv[3], &remote.sin_addr) != 1 || *end || v > 0xffffff) {
        fprintf(stderr, "gdp-tunfwd: bad arguments (DEV < %d bytes, IPv4 addresses, VNI "
                        "0..16777215)\n", IFNAMSIZ);
        return 2;
    }
    vni = (uint32_t)v;
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    pthread_sigmask(SIG_BLOCK, &stop, NULL); /* the threads inherit it */

    tun_fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (tun_fd < 0)
        die("/dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    strcpy(ifr.ifr_name, argv[1]);
    if (ioctl(tun_fd, TUNSETIFF, &ifr) < 0)
        die(argv[1]);
    udp_fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (udp_fd < 0)
        die("socket");
    if (bind(udp_fd, (struct sockaddr *)&local, sizeof(local)) < 0)
        die("bind");
    if (connect(udp_fd, (struct sockaddr *)&remote, sizeof(remote)) < 0)
        die("connect");

    pthread_t th;
    if (pthread_create(&th, NULL, encap, NULL) != 0 ||
        pthread_create(&th, NULL, decap, NULL) != 0) {
        fprintf(stderr, "gdp-tunfwd: cannot start a thread\n");
        return 1;
    }
    fprintf(stderr, "ready\n");
    int sig;
    sigwait(&stop, &sig);
    printf("{\"packets\": [%llu, %llu], \"errors\": %llu, \"dropped\": %llu}\n",
           (unsigned long long)out_pkts, (unsigned long long)in_pkts,
           (unsigned long long)errors, (unsigned long long)dropped);
    fflush(stdout);
    _exit(0); /* the threads sit in read() and recv() */
}
