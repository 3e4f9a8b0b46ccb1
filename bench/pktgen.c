/* gdp-pktgen: a pktgen-style UDP traffic generator, counting sink, and request/response
 * latency probe for the geneve-dp benchmarks.
 *
 * The kernels here have no pktgen module, so the generator is ours. It must be faster
 * than every path it measures, so the hot loops are batched (sendmmsg/recvmmsg), take one
 * clock reading per batch, and never allocate.
 *
 * Every payload starts with a 16-byte header, all fields big-endian:
 *   offset 0  u16 magic 0x6744
 *   offset 2  u16 flow index (which source port sent it)
 *   offset 4  u32 sequence number, per flow, starting at 0
 *   offset 8  u64 send time, CLOCK_MONOTONIC nanoseconds
 * --size is the UDP payload; --frame-size the whole Ethernet frame it makes, FCS
 * included (RFC 2544 sizes: 64 is an 18-byte payload over IPv4, 1518 a 1472-byte one).
 * Sender and receiver run on one machine (in different network namespaces, which share
 * the clock), so receive time minus send time is the one-way latency.
 *
 * Modes (each prints one JSON object on stdout when it ends):
 *   send       --dst IP --port N [--sport BASE] [--flows N] [--size BYTES | --frame-size F]
 *              [--rate PPS] [--duration S | --count N] [--burst N]
 *              [--ifname DEV --src IP [--dst-mac MAC]]   (raw: AF_PACKET, see run_send_raw)
 *   send-frames --ifname DEV --templates FILE [--rate PPS] [--duration S | --count N]
 *              [--burst N]   (whole frames from FILE, round robin: see run_send_frames)
 *   sink       --bind IP --port N [--timeout S] [--idle S] [--max-samples N]
 *   rr-server  --bind IP --port N [--timeout S]
 *   rr         --dst IP --port N [--size BYTES] [--duration S | --count N]
 *              [--wait-ms MS] [--max-samples N] [--rate PER_S]
 *              (--rate: requests start PER_S times a second on a fixed schedule, still
 *              one at a time, so the path idles between them: interactive traffic)
 * sink and rr-server write "ready" on stderr once their socket is bound, so a driver
 * knows when to start the sender. They stop on SIGTERM/SIGINT, after --timeout seconds,
 * or (sink only) after --idle seconds without a packet once the first one arrived. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <net/if_arp.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x6744u
#define HDR_LEN 16
#define MAX_PAYLOAD 65507
#define MAX_BURST 1024
#define MAX_FLOWS 4096
#define RX_BATCH 64
/* The sink's buffers hold whole datagrams; anything longer is truncated and still
 * counted (recvmmsg reports the true length only with MSG_TRUNC). */
#define RX_BUF 2048
#define CDF_POINTS 201

static volatile sig_atomic_t g_stop;

static void on_signal(int sig) {
    (void)sig;
    g_stop = 1;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void store16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static void store32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (24 - 8 * i));
}

static void store64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (56 - 8 * i));
}

static uint16_t load16(const uint8_t *p) { return (uint16_t)((uint16_t)p[0] << 8 | p[1]); }

static uint32_t load32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t load64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = v << 8 | p[i];
    return v;
}

static _Noreturn void die(const char *what) {
    fprintf(stderr, "gdp-pktgen: %s: %s\n", what, strerror(errno));
    exit(1);
}

static _Noreturn void usage_error(const char *msg, const char *arg) {
    fprintf(stderr, "gdp-pktgen: %s%s%s\n", msg, arg ? ": " : "", arg ? arg : "");
    exit(2);
}

/* ---------- options ---------- */

struct opts {
    const char *mode;
    const char *addr;
    const char *ifname;
    const char *src;
    const char *dst_mac;
    const char *templates;
    int port;
    int sport;
    int flows;
    int size;
    int frame_size;
    int burst;
    double rate;
    double duration;
    uint64_t count;
    double timeout;
    double idle;
    int wait_ms;
    size_t max_samples;
};

static double parse_num(const char *name, const char *text, double lo, double hi) {
    char *end = NULL;
    errno = 0;
    double v = strtod(text, &end);
    if (errno || end == text || *end || v < lo || v > hi) {
        fprintf(stderr, "gdp-pktgen: %s: %s is not a number in %.0f..%.0f\n", name, text, lo, hi);
        exit(2);
    }
    return v;
}

static void parse_opts(int argc, char **argv, struct opts *o) {
    if (argc < 2) usage_error("usage: gdp-pktgen send|sink|rr|rr-server [options]", NULL);
    memset(o, 0, sizeof *o);
    o->mode = argv[1];
    o->flows = 1;
    o->size = 18;
    o->burst = 32;
    o->timeout = 60;
    o->idle = 0.5;
    o->wait_ms = 200;
    o->max_samples = 200000;
    for (int i = 2; i < argc; i++) {
        const char *k = argv[i];
        if (i + 1 >= argc) usage_error("option needs a value", k);
        const char *v = argv[++i];
        if (!strcmp(k, "--dst") || !strcmp(k, "--bind")) o->addr = v;
        else if (!strcmp(k, "--port")) o->port = (int)parse_num(k, v, 1, 65535);
        else if (!strcmp(k, "--sport")) o->sport = (int)parse_num(k, v, 1, 65535);
        else if (!strcmp(k, "--flows")) o->flows = (int)parse_num(k, v, 1, MAX_FLOWS);
        else if (!strcmp(k, "--size")) o->size = (int)parse_num(k, v, HDR_LEN, MAX_PAYLOAD);
        else if (!strcmp(k, "--ifname")) o->ifname = v;
        else if (!strcmp(k, "--src")) o->src = v;
        else if (!strcmp(k, "--dst-mac")) o->dst_mac = v;
        else if (!strcmp(k, "--templates")) o->templates = v;
        else if (!strcmp(k, "--frame-size")) o->frame_size = (int)parse_num(k, v, 64, 65535);
        else if (!strcmp(k, "--burst")) o->burst = (int)parse_num(k, v, 1, MAX_BURST);
        else if (!strcmp(k, "--rate")) o->rate = parse_num(k, v, 0, 1e9);
        else if (!strcmp(k, "--duration")) o->duration = parse_num(k, v, 0, 86400);
        else if (!strcmp(k, "--count")) o->count = (uint64_t)parse_num(k, v, 0, 1e15);
        else if (!strcmp(k, "--timeout")) o->timeout = parse_num(k, v, 0.01, 86400);
        else if (!strcmp(k, "--idle")) o->idle = parse_num(k, v, 0.001, 86400);
        else if (!strcmp(k, "--wait-ms")) o->wait_ms = (int)parse_num(k, v, 1, 60000);
        else if (!strcmp(k, "--max-samples")) o->max_samples = (size_t)parse_num(k, v, 1, 1e8);
        else usage_error("unknown option", k);
    }
    if (!strcmp(o->mode, "send-frames")) {
        if (!o->ifname || !o->templates)
            usage_error("send-frames needs --ifname DEV and --templates FILE", NULL);
        return;
    }
    if (!o->addr) usage_error("--dst (send, rr) or --bind (sink, rr-server) is required", NULL);
    if (!o->port) usage_error("--port is required", NULL);
    if (o->frame_size) {
        /* Ethernet header + FCS, then IPv4 (20) or IPv6 (40), then UDP (8). */
        int l3 = strchr(o->addr, ':') ? 40 : 20;
        o->size = o->frame_size - 18 - l3 - 8;
        if (o->size < HDR_LEN) usage_error("--frame-size leaves less than a 16-byte payload", NULL);
    }
    if (o->sport && o->sport + o->flows - 1 > 65535) usage_error("--sport + --flows > 65535", NULL);
}

/* IPv4 or IPv6 literal -> sockaddr; returns its length. */
static socklen_t make_addr(const char *text, int port, struct sockaddr_storage *ss) {
    memset(ss, 0, sizeof *ss);
    struct sockaddr_in *in4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, text, &in4->sin_addr) == 1) {
        in4->sin_family = AF_INET;
        in4->sin_port = htons((uint16_t)port);
        return sizeof *in4;
    }
    if (inet_pton(AF_INET6, text, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)port);
        return sizeof *in6;
    }
    usage_error("not an IPv4 or IPv6 address", text);
    return 0;
}

static int udp_socket(int family) {
    int fd = socket(family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    return fd;
}

/* Big socket buffers so the measuring end is not what drops: FORCE variants work as
 * root past rmem_max/wmem_max; fall back to the plain ones otherwise. */
static void big_buffers(int fd) {
    int sz = 8 << 20;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &sz, sizeof sz) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sz, sizeof sz) < 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
}

static int bound_socket(const struct opts *o) {
    struct sockaddr_storage ss;
    socklen_t len = make_addr(o->addr, o->port, &ss);
    int fd = udp_socket(ss.ss_family);
    big_buffers(fd);
    if (bind(fd, (struct sockaddr *)&ss, len) < 0) die("bind");
    fprintf(stderr, "ready\n");
    fflush(stderr);
    return fd;
}

/* Pacing: each burst has a due time on an absolute schedule, so sleep overshoot is
 * made up by later bursts instead of drifting the average rate. A send mode runs
 * until --count packets, --duration seconds, or (neither given) 1 s. */
struct schedule {
    uint64_t limit, start, end;
    double ns_per_pkt, due;
};

static void schedule_init(struct schedule *s, const struct opts *o) {
    s->limit = o->count ? o->count : UINT64_MAX;
    s->start = now_ns();
    s->end = o->duration > 0 ? s->start + (uint64_t)(o->duration * 1e9) : UINT64_MAX;
    if (!o->count && o->duration <= 0) s->end = s->start + 1000000000ull; /* neither: 1 s */
    s->ns_per_pkt = o->rate > 0 ? 1e9 / o->rate : 0;
    s->due = (double)s->start;
}

/* Wait until the next burst is due (with --rate); *t is the time now, updated after a
 * sleep. Returns 0 when the run's time ran out meanwhile. */
static int schedule_wait(struct schedule *s, uint64_t *t) {
    if (s->ns_per_pkt <= 0) return 1;
    if ((double)*t < s->due) {
        uint64_t d = (uint64_t)s->due;
        struct timespec ts = {(time_t)(d / 1000000000ull), (long)(d % 1000000000ull)};
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
        *t = now_ns();
        if (*t >= s->end) return 0;
    } else if ((double)*t - s->due > 1e8) {
        s->due = (double)*t; /* stalled >100 ms (descheduled): don't burst to catch up */
    }
    return 1;
}

/* A burst of n was offered and r of them sent: the next one is due that much later. */
static void schedule_sent(struct schedule *s, int r, int n) {
    s->due += s->ns_per_pkt * (r ? r : n);
}

/* An AF_PACKET socket that only sends, bound to a device, past its qdisc. */
static int packet_socket(const char *ifname) {
    unsigned ifindex = if_nametoindex(ifname);
    if (!ifindex) usage_error("no such interface", ifname);
    int fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0); /* 0: send only, receive nothing */
    if (fd < 0) die("socket(AF_PACKET)");
    struct sockaddr_ll ll;
    memset(&ll, 0, sizeof ll);
    ll.sll_family = AF_PACKET;
    ll.sll_protocol = htons(ETH_P_IP);
    ll.sll_ifindex = (int)ifindex;
    if (bind(fd, (struct sockaddr *)&ll, sizeof ll) < 0) die("bind(AF_PACKET)");
    int one = 1;
    if (setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof one) < 0)
        die("PACKET_QDISC_BYPASS");
    big_buffers(fd);
    return fd;
}

static void install_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; /* no SA_RESTART: poll must return EINTR to see g_stop */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
}

static void fill_header(uint8_t *p, uint16_t flow, uint32_t seq, uint64_t ts) {
    store16(p, MAGIC);
    store16(p + 2, flow);
    store32(p + 4, seq);
    store64(p + 8, ts);
}

/* ---------- latency samples: reservoir, so a long run is sampled uniformly ---------- */

struct samples {
    uint64_t *v;
    size_t n, cap;
    uint64_t seen;
    uint64_t rng;
    uint64_t sum, min, max;
};

static void samples_init(struct samples *s, size_t cap) {
    memset(s, 0, sizeof *s);
    s->v = calloc(cap, sizeof *s->v);
    if (!s->v) die("calloc");
    s->cap = cap;
    s->rng = 0x9e3779b97f4a7c15ull;
    s->min = UINT64_MAX;
}

static uint64_t xorshift(uint64_t *x) {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

static void samples_add(struct samples *s, uint64_t v) {
    s->seen++;
    s->sum += v;
    if (v < s->min) s->min = v;
    if (v > s->max) s->max = v;
    if (s->n < s->cap) {
        s->v[s->n++] = v;
    } else {
        uint64_t j = xorshift(&s->rng) % s->seen;
        if (j < s->cap) s->v[j] = v;
    }
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile on the sorted reservoir. */
static uint64_t pct(const struct samples *s, double p) {
    if (!s->n) return 0;
    double r = p / 100.0 * (double)s->n;
    size_t i = (size_t)r;
    if ((double)i < r) i++;
    if (i < 1) i = 1;
    if (i > s->n) i = s->n;
    return s->v[i - 1];
}

/* "latency_ns": {...} with percentiles, and a CDF of CDF_POINTS evenly spaced ranks
 * (enough for a plot without shipping every sample). */
static void print_latency(const struct samples *s, int with_cdf) {
    qsort(s->v, s->n, sizeof *s->v, cmp_u64);
    printf("\"latency_ns\": {\"count\": %" PRIu64 ", \"sampled\": %zu", s->seen, s->n);
    if (s->n) {
        printf(", \"min\": %" PRIu64 ", \"mean\": %.1f, \"p50\": %" PRIu64 ", \"p90\": %" PRIu64
               ", \"p99\": %" PRIu64 ", \"p999\": %" PRIu64 ", \"max\": %" PRIu64,
               s->min, (double)s->sum / (double)s->seen, pct(s, 50), pct(s, 90), pct(s, 99),
               pct(s, 99.9), s->max);
    }
    printf("}");
    if (with_cdf) {
        printf(", \"cdf_ns\": [");
        for (size_t i = 0; s->n && i < CDF_POINTS; i++) {
            size_t idx = (size_t)((double)i / (CDF_POINTS - 1) * (double)(s->n - 1));
            printf("%s%" PRIu64, i ? ", " : "", s->v[idx]);
        }
        printf("]");
    }
}

/* ---------- send ---------- */

static int run_send(const struct opts *o) {
    struct sockaddr_storage dst;
    socklen_t dlen = make_addr(o->addr, o->port, &dst);
    int fds[MAX_FLOWS];
    uint32_t seq[MAX_FLOWS];
    /* One connected socket per flow: distinct source ports give the tunnels under test
     * distinct flows to hash, and connect() caches the route so the hot loop skips it. */
    for (int f = 0; f < o->flows; f++) {
        fds[f] = udp_socket(dst.ss_family);
        big_buffers(fds[f]);
        if (o->sport) {
            struct sockaddr_storage src;
            memset(&src, 0, sizeof src);
            src.ss_family = dst.ss_family;
            if (dst.ss_family == AF_INET)
                ((struct sockaddr_in *)&src)->sin_port = htons((uint16_t)(o->sport + f));
            else
                ((struct sockaddr_in6 *)&src)->sin6_port = htons((uint16_t)(o->sport + f));
            if (bind(fds[f], (struct sockaddr *)&src, dlen) < 0) die("bind source port");
        }
        if (connect(fds[f], (struct sockaddr *)&dst, dlen) < 0) die("connect");
        seq[f] = 0;
    }
    size_t size = (size_t)o->size;
    uint8_t *bufs = calloc((size_t)o->burst, size);
    struct mmsghdr *msgs = calloc((size_t)o->burst, sizeof *msgs);
    struct iovec *iov = calloc((size_t)o->burst, sizeof *iov);
    if (!bufs || !msgs || !iov) die("calloc");
    for (int i = 0; i < o->burst; i++) {
        iov[i].iov_base = bufs + (size_t)i * size;
        iov[i].iov_len = size;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    install_signals();
    uint64_t sent = 0, errors = 0, refused = 0, bursts = 0;
    struct schedule sch;
    schedule_init(&sch, o);
    int f = 0;
    uint64_t t = sch.start;
    while (!g_stop && sent < sch.limit && t < sch.end) {
        uint64_t want = sch.limit - sent;
        int n = want < (uint64_t)o->burst ? (int)want : o->burst;
        if (!schedule_wait(&sch, &t)) break;
        for (int i = 0; i < n; i++) fill_header(bufs + (size_t)i * size, (uint16_t)f, seq[f] + (uint32_t)i, t);
        int r = sendmmsg(fds[f], msgs, (unsigned)n, 0);
        if (r < 0) {
            /* An ICMP port-unreachable from a sink not yet listening (or gone) shows up
             * here once; anything else (ENOBUFS) is back-pressure. Either way the
             * sequence numbers are not consumed, so the sink never counts these as lost. */
            if (errno == ECONNREFUSED) refused++;
            else if (errno != EINTR) errors++;
            r = 0;
        }
        seq[f] += (uint32_t)r;
        sent += (uint64_t)r;
        bursts++;
        schedule_sent(&sch, r, n);
        f = (f + 1) % o->flows;
        t = now_ns();
    }
    double elapsed = (double)(t - sch.start) / 1e9;
    printf("{\"mode\": \"send\", \"sent_packets\": %" PRIu64 ", \"sent_bytes\": %" PRIu64
           ", \"elapsed_s\": %.6f, \"pps\": %.1f, \"errors\": %" PRIu64 ", \"refused\": %" PRIu64
           ", \"bursts\": %" PRIu64 ", \"flows\": %d, \"payload_size\": %d, \"burst\": %d"
           ", \"rate\": %.1f}\n",
           sent, sent * size, elapsed, elapsed > 0 ? (double)sent / elapsed : 0.0, errors,
           refused, bursts, o->flows, o->size, o->burst, o->rate);
    return 0;
}

/* ---------- send, raw frames ---------- */

/* IPv4 header checksum (RFC 1071) over a 20-byte header. */
static uint16_t ip_checksum(const uint8_t *h) {
    uint32_t sum = 0;
    for (int i = 0; i < 20; i += 2) sum += (uint32_t)load16(h + i);
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

/* pktgen's way in: whole frames written with AF_PACKET straight to a device's driver
 * (PACKET_QDISC_BYPASS skips the qdisc layer too), so no socket, route or neighbour
 * lookup is paid per packet. IPv4 only; the UDP checksum is 0 (allowed for IPv4).
 * Ethernet devices get an Ethernet header (--dst-mac, default broadcast, so that a
 * TAP or veth peer accepts it); devices without link header (TUN) get bare IPv4. */
static int run_send_raw(const struct opts *o) {
    struct in_addr src, dst;
    if (!o->src || inet_pton(AF_INET, o->src, &src) != 1)
        usage_error("raw send needs --src with an IPv4 address", o->src);
    if (inet_pton(AF_INET, o->addr, &dst) != 1) usage_error("raw send is IPv4 only", o->addr);
    uint8_t dmac[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    if (o->dst_mac && sscanf(o->dst_mac, "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &dmac[0], &dmac[1],
                             &dmac[2], &dmac[3], &dmac[4], &dmac[5]) != 6)
        usage_error("--dst-mac is not a MAC address", o->dst_mac);
    int fd = packet_socket(o->ifname);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", o->ifname);
    if (ioctl(fd, SIOCGIFHWADDR, &ifr) < 0) die("SIOCGIFHWADDR");
    int ether = ifr.ifr_hwaddr.sa_family == ARPHRD_ETHER;
    size_t l2 = ether ? 14 : 0;

    size_t size = (size_t)o->size;
    size_t hdr = l2 + 20 + 8, frame = hdr + size;
    /* One header template per flow: only the UDP source port differs. */
    uint8_t *tmpl = calloc((size_t)o->flows, hdr);
    uint8_t *bufs = calloc((size_t)o->burst, frame);
    struct mmsghdr *msgs = calloc((size_t)o->burst, sizeof *msgs);
    struct iovec *iov = calloc((size_t)o->burst, sizeof *iov);
    uint32_t *seq = calloc((size_t)o->flows, sizeof *seq);
    if (!tmpl || !bufs || !msgs || !iov || !seq) die("calloc");
    int sport = o->sport ? o->sport : 20000;
    for (int f = 0; f < o->flows; f++) {
        uint8_t *h = tmpl + (size_t)f * hdr;
        if (ether) {
            memcpy(h, dmac, 6);
            memcpy(h + 6, ifr.ifr_hwaddr.sa_data, 6);
            store16(h + 12, ETH_P_IP);
        }
        uint8_t *ip = h + l2;
        ip[0] = 0x45;
        store16(ip + 2, (uint16_t)(20 + 8 + size));
        ip[8] = 64;
        ip[9] = IPPROTO_UDP;
        memcpy(ip + 12, &src, 4);
        memcpy(ip + 16, &dst, 4);
        store16(ip + 10, ip_checksum(ip));
        uint8_t *udp = ip + 20;
        store16(udp, (uint16_t)(sport + f));
        store16(udp + 2, (uint16_t)o->port);
        store16(udp + 4, (uint16_t)(8 + size));
    }
    for (int i = 0; i < o->burst; i++) {
        iov[i].iov_base = bufs + (size_t)i * frame;
        iov[i].iov_len = frame;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    install_signals();
    uint64_t sent = 0, errors = 0, bursts = 0;
    struct schedule sch;
    schedule_init(&sch, o);
    uint64_t t = sch.start;
    int f = 0;
    while (!g_stop && sent < sch.limit && t < sch.end) {
        uint64_t want = sch.limit - sent;
        int n = want < (uint64_t)o->burst ? (int)want : o->burst;
        if (!schedule_wait(&sch, &t)) break;
        for (int i = 0; i < n; i++) {
            uint8_t *b = bufs + (size_t)i * frame;
            memcpy(b, tmpl + (size_t)f * hdr, hdr);
            fill_header(b + hdr, (uint16_t)f, seq[f] + (uint32_t)i, t);
        }
        int r = sendmmsg(fd, msgs, (unsigned)n, 0);
        if (r < 0) {
            if (errno != EINTR) errors++; /* ENOBUFS: the device queue is full */
            r = 0;
        }
        seq[f] += (uint32_t)r;
        sent += (uint64_t)r;
        bursts++;
        schedule_sent(&sch, r, n);
        f = (f + 1) % o->flows;
        t = now_ns();
    }
    double elapsed = (double)(t - sch.start) / 1e9;
    printf("{\"mode\": \"send\", \"raw\": true, \"ifname\": \"%s\", \"sent_packets\": %" PRIu64
           ", \"sent_bytes\": %" PRIu64 ", \"frame_bytes\": %zu, \"elapsed_s\": %.6f, \"pps\": %.1f"
           ", \"errors\": %" PRIu64 ", \"refused\": 0, \"bursts\": %" PRIu64 ", \"flows\": %d"
           ", \"payload_size\": %d, \"burst\": %d, \"rate\": %.1f}\n",
           o->ifname, sent, sent * size, frame, elapsed, elapsed > 0 ? (double)sent / elapsed : 0.0,
           errors, bursts, o->flows, o->size, o->burst, o->rate);
    return 0;
}

/* ---------- send, frames from a file ---------- */

#define MAX_TEMPLATES 4096
#define MAX_FRAME 9216

/* Hostile-input floods: whole frames, link header included, read from --templates (a
 * sequence of records: u16 big-endian length, then that many bytes), written to
 * --ifname with AF_PACKET round robin, as fast as the device takes them (or --rate).
 * Nothing in them is fixed up: outer sources can be spoofed and headers wrong on
 * purpose. The report counts what was sent of each template, in file order, so a test
 * can compare the receiver's counters reason by reason. */
static int run_send_frames(const struct opts *o) {
    FILE *in = fopen(o->templates, "rb");
    if (!in) usage_error("cannot open --templates", o->templates);
    uint8_t *data = malloc((size_t)MAX_TEMPLATES * MAX_FRAME);
    size_t *len = calloc(MAX_TEMPLATES, sizeof *len);
    uint64_t *count = calloc(MAX_TEMPLATES, sizeof *count);
    if (!data || !len || !count) die("calloc");
    size_t nt = 0;
    uint8_t lb[2];
    while (fread(lb, 1, 2, in) == 2) {
        size_t l = load16(lb);
        if (nt == MAX_TEMPLATES) usage_error("more than 4096 templates", o->templates);
        if (l < 1 || l > MAX_FRAME) usage_error("a template is empty or over 9216 bytes", o->templates);
        if (fread(data + nt * MAX_FRAME, 1, l, in) != l) usage_error("a template is cut short", o->templates);
        len[nt++] = l;
    }
    fclose(in);
    if (!nt) usage_error("no templates in", o->templates);
    int fd = packet_socket(o->ifname);
    struct mmsghdr *msgs = calloc((size_t)o->burst, sizeof *msgs);
    struct iovec *iov = calloc((size_t)o->burst, sizeof *iov);
    size_t *which = calloc((size_t)o->burst, sizeof *which);
    if (!msgs || !iov || !which) die("calloc");
    install_signals();
    uint64_t sent = 0, errors = 0, bursts = 0;
    struct schedule sch;
    schedule_init(&sch, o);
    uint64_t t = sch.start;
    size_t next = 0;
    while (!g_stop && sent < sch.limit && t < sch.end) {
        uint64_t want = sch.limit - sent;
        int n = want < (uint64_t)o->burst ? (int)want : o->burst;
        if (!schedule_wait(&sch, &t)) break;
        for (int i = 0; i < n; i++) {
            size_t k = (next + (size_t)i) % nt;
            which[i] = k;
            iov[i].iov_base = data + k * MAX_FRAME;
            iov[i].iov_len = len[k];
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int r = sendmmsg(fd, msgs, (unsigned)n, 0);
        if (r < 0) {
            if (errno != EINTR) errors++; /* ENOBUFS: the device queue is full */
            r = 0;
        }
        for (int i = 0; i < r; i++) count[which[i]]++;
        next = (next + (size_t)r) % nt; /* unsent templates go first next time */
        sent += (uint64_t)r;
        bursts++;
        schedule_sent(&sch, r, n);
        t = now_ns();
    }
    double elapsed = (double)(t - sch.start) / 1e9;
    printf("{\"mode\": \"send-frames\", \"ifname\": \"%s\", \"templates\": %zu, \"sent_packets\": %"
           PRIu64 ", \"elapsed_s\": %.6f, \"pps\": %.1f, \"errors\": %" PRIu64 ", \"bursts\": %"
           PRIu64 ", \"per_template\": [",
           o->ifname, nt, sent, elapsed, elapsed > 0 ? (double)sent / elapsed : 0.0, errors, bursts);
    for (size_t k = 0; k < nt; k++) printf("%s%" PRIu64, k ? ", " : "", count[k]);
    printf("]}\n");
    return 0;
}

/* ---------- sink ---------- */

struct flow_state {
    uint64_t received;
    uint64_t reordered;
    uint64_t duplicates;
    uint32_t max_seq;
    int seen;
};

static int run_sink(const struct opts *o) {
    install_signals();
    int fd = bound_socket(o);
    static uint8_t bufs[RX_BATCH][RX_BUF];
    struct mmsghdr msgs[RX_BATCH];
    struct iovec iov[RX_BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < RX_BATCH; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = RX_BUF;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    struct flow_state *flows = calloc(65536, sizeof *flows);
    if (!flows) die("calloc");
    struct samples lat;
    samples_init(&lat, o->max_samples);
    uint64_t pkts = 0, bytes = 0, bad = 0, first = 0, last = 0;
    uint64_t start = now_ns();
    uint64_t deadline = start + (uint64_t)(o->timeout * 1e9);
    uint64_t idle_ns = (uint64_t)(o->idle * 1e9);
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    for (;;) {
        if (g_stop) break;
        uint64_t t = now_ns();
        if (t >= deadline) break;
        if (pkts && t - last >= idle_ns) break;
        /* Wake at least every 20 ms to check the idle and hard deadlines. */
        int pr = poll(&pfd, 1, 20);
        if (pr <= 0) continue;
        /* Drain everything queued before polling again: poll costs a syscall per wakeup
         * and the point is to keep up with the sender. */
        for (;;) {
            int n = recvmmsg(fd, msgs, RX_BATCH, MSG_DONTWAIT, NULL);
            if (n <= 0) break;
            uint64_t rx = now_ns();
            if (!pkts) first = rx;
            last = rx;
            for (int i = 0; i < n; i++) {
                size_t len = msgs[i].msg_len;
                const uint8_t *p = bufs[i];
                pkts++;
                bytes += len;
                if (len < HDR_LEN || load16(p) != MAGIC) {
                    bad++;
                    continue;
                }
                struct flow_state *fs = &flows[load16(p + 2)];
                uint32_t s = load32(p + 4);
                uint64_t ts = load64(p + 8);
                fs->received++;
                if (!fs->seen) {
                    fs->seen = 1;
                    fs->max_seq = s;
                } else if (s > fs->max_seq) {
                    fs->max_seq = s;
                } else if (s == fs->max_seq) {
                    fs->duplicates++;
                } else {
                    fs->reordered++;
                }
                if (rx >= ts) samples_add(&lat, rx - ts);
            }
            if (n < RX_BATCH) break;
        }
    }
    uint64_t lost = 0, reordered = 0, dups = 0, nflows = 0, good = 0;
    for (int f = 0; f < 65536; f++) {
        struct flow_state *fs = &flows[f];
        if (!fs->seen) continue;
        nflows++;
        reordered += fs->reordered;
        dups += fs->duplicates;
        good += fs->received;
        /* Sequences start at 0, so max_seq + 1 were sent up to the newest one seen; a
         * tail lost after that is invisible here (the driver compares with sent). */
        uint64_t expect = (uint64_t)fs->max_seq + 1;
        uint64_t uniq = fs->received - fs->duplicates;
        if (expect > uniq) lost += expect - uniq;
    }
    double span = pkts > 1 ? (double)(last - first) / 1e9 : 0;
    printf("{\"mode\": \"sink\", \"received_packets\": %" PRIu64 ", \"received_bytes\": %" PRIu64
           ", \"valid_packets\": %" PRIu64 ", \"bad_packets\": %" PRIu64 ", \"flows_seen\": %" PRIu64
           ", \"lost\": %" PRIu64 ", \"reordered\": %" PRIu64 ", \"duplicates\": %" PRIu64
           ", \"span_s\": %.6f, \"pps\": %.1f, ",
           pkts, bytes, good, bad, nflows, lost, reordered, dups, span,
           span > 0 ? (double)(pkts - 1) / span : 0.0);
    print_latency(&lat, 0);
    printf("}\n");
    return 0;
}

/* ---------- request/response ---------- */

static int run_rr_server(const struct opts *o) {
    install_signals();
    int fd = bound_socket(o);
    static uint8_t bufs[RX_BATCH][RX_BUF];
    struct sockaddr_storage peers[RX_BATCH];
    struct mmsghdr msgs[RX_BATCH];
    struct iovec iov[RX_BATCH];
    uint64_t echoed = 0;
    uint64_t deadline = now_ns() + (uint64_t)(o->timeout * 1e9);
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    while (!g_stop && now_ns() < deadline) {
        if (poll(&pfd, 1, 20) <= 0) continue;
        for (int i = 0; i < RX_BATCH; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = RX_BUF;
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = &peers[i];
            msgs[i].msg_hdr.msg_namelen = sizeof peers[i];
        }
        int n = recvmmsg(fd, msgs, RX_BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) continue;
        /* Echo each request back to its sender unchanged (the timestamp inside is the
         * client's, so the client measures the full round trip). */
        for (int i = 0; i < n; i++) iov[i].iov_len = msgs[i].msg_len;
        int s = sendmmsg(fd, msgs, (unsigned)n, 0);
        if (s > 0) echoed += (uint64_t)s;
    }
    printf("{\"mode\": \"rr-server\", \"echoed\": %" PRIu64 "}\n", echoed);
    return 0;
}

static int run_rr(const struct opts *o) {
    struct sockaddr_storage dst;
    socklen_t dlen = make_addr(o->addr, o->port, &dst);
    int fd = udp_socket(dst.ss_family);
    if (connect(fd, (struct sockaddr *)&dst, dlen) < 0) die("connect");
    install_signals();
    size_t size = (size_t)o->size;
    uint8_t rsp[RX_BUF];
    uint8_t *req = calloc(1, size);
    if (!req) die("calloc");
    struct samples lat;
    samples_init(&lat, o->max_samples);
    uint64_t limit = o->count ? o->count : UINT64_MAX;
    uint64_t start = now_ns();
    uint64_t end = o->duration > 0 ? start + (uint64_t)(o->duration * 1e9) : UINT64_MAX;
    if (!o->count && o->duration <= 0) end = start + 1000000000ull;
    uint64_t requests = 0, responses = 0, timeouts = 0, stale = 0, errors = 0;
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    /* One request outstanding at a time (ping-pong), like netperf's UDP_RR: the figure is
     * the latency of an idle path, not of a queue. A lost request or reply costs one
     * --wait-ms and is counted as a timeout, never as a sample. */
    uint64_t period = o->rate > 0 ? (uint64_t)(1e9 / o->rate) : 0;
    for (uint32_t seq = 0; !g_stop && requests < limit; seq++) {
        if (period) {
            /* The k-th request's slot; one missed behind a slow reply goes at once. */
            uint64_t slot = start + (uint64_t)seq * period;
            if (slot >= end) break;
            struct timespec ts = {(time_t)(slot / 1000000000ull), (long)(slot % 1000000000ull)};
            while (!g_stop && now_ns() < slot &&
                   clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
            }
        }
        uint64_t t0 = now_ns();
        if (t0 >= end) break;
        fill_header(req, 0, seq, t0);
        if (send(fd, req, size, 0) < 0) {
            errors++;
            /* ECONNREFUSED: the server is not there (yet); don't spin. */
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
            continue;
        }
        requests++;
        uint64_t give_up = t0 + (uint64_t)o->wait_ms * 1000000ull;
        for (;;) {
            uint64_t t = now_ns();
            if (t >= give_up || g_stop) {
                timeouts++;
                break;
            }
            int ms = (int)((give_up - t + 999999) / 1000000);
            if (poll(&pfd, 1, ms) <= 0) continue;
            ssize_t r = recv(fd, rsp, sizeof rsp, MSG_DONTWAIT);
            uint64_t t1 = now_ns();
            if (r < HDR_LEN) {
                if (r < 0 && errno != EAGAIN && errno != EINTR) errors++;
                continue;
            }
            if (load16(rsp) != MAGIC || load32(rsp + 4) != seq) {
                stale++; /* a late reply to an earlier, timed-out request */
                continue;
            }
            responses++;
            samples_add(&lat, t1 - load64(rsp + 8));
            break;
        }
    }
    double elapsed = (double)(now_ns() - start) / 1e9;
    printf("{\"mode\": \"rr\", \"requests\": %" PRIu64 ", \"responses\": %" PRIu64
           ", \"timeouts\": %" PRIu64 ", \"stale\": %" PRIu64 ", \"errors\": %" PRIu64
           ", \"elapsed_s\": %.6f, \"payload_size\": %d, ",
           requests, responses, timeouts, stale, errors, elapsed, o->size);
    print_latency(&lat, 1);
    printf("}\n");
    return 0;
}

int main(int argc, char **argv) {
    struct opts o;
    parse_opts(argc, argv, &o);
    setvbuf(stdout, NULL, _IOFBF, 1 << 16);
    int rc = 2;
    if (!strcmp(o.mode, "send-frames")) rc = run_send_frames(&o);
    else if (!strcmp(o.mode, "send") && o.ifname) rc = run_send_raw(&o);
    else if (!strcmp(o.mode, "send")) rc = run_send(&o);
    else if (!strcmp(o.mode, "sink")) rc = run_sink(&o);
    else if (!strcmp(o.mode, "rr")) rc = run_rr(&o);
    else if (!strcmp(o.mode, "rr-server")) rc = run_rr_server(&o);
    else usage_error("unknown mode (send, send-frames, sink, rr, rr-server)", o.mode);
    fflush(stdout);
    return rc;
}
