/* GENEVE tunnel endpoint engine (see engine.h).
 *
 * Receive: recvmmsg a batch of datagrams from the UDP socket (outer TOS from the
 * IP_TOS / IPV6_TCLASS cmsg, outer source from msg_name), decode with gdp_decode,
 * find the tunnel by VNI + outer source, apply the kernel geneve checks, and write
 * the inner frame to the tunnel's device.
 *
 * Transmit: read frames from the devices straight into buffer + GDP_HEADROOM, write
 * GENEVE, UDP and outer IP headers in front of them and hand a batch to sendmmsg on
 * a raw socket. The raw socket is what lets the UDP source port follow the inner
 * flow hash (a socket bound to 6081 could only ever send from 6081).
 *
 * No allocation here: the caller hands in every buffer (gdp_engine_init). */
#define _GNU_SOURCE
#include "engine.h"

#include <errno.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "auth.h"
#include "bytes.h"

#define TX_SLOTS (GDP_BATCH * 4)
#define CMSG_BUF 96
#define ICMP_BUF (14 + 40 + 8 + 1232)
#define SEG_INNER_MAX 192 /* Ethernet + VLAN + IPv6 or IPv4 with options + TCP + options */
#define SEG_HDR_MAX (40 + 8 + GDP_MAX_HEADER_LEN + SEG_INNER_MAX)

#define GSO_MAX_SEGS 40     /* per UDP GSO send: below UDP_MAX_SEGMENTS and 64 KiB */
#define UDP_SEGMENT_OPT 103 /* linux/udp.h UDP_SEGMENT */
#define UDP_GRO_OPT 104     /* linux/udp.h UDP_GRO */
#define IP_RECVFRAGSIZE_OPT 25   /* linux/in.h */
#define IPV6_RECVFRAGSIZE_OPT 77 /* linux/in6.h */
#ifndef SOL_UDP
#define SOL_UDP 17
#endif

#define VNET_F_NEEDS_CSUM 1
#define VNET_GSO_NONE 0
#define VNET_GSO_TCPV4 1
#define VNET_GSO_TCPV6 4
#define VNET_GSO_UDP_L4 5
#define VNET_GSO_ECN 0x80
/* Datagrams per coalesced UDP super-frame: the kernel's UDP_MAX_SEGMENTS is 64 on
 * older kernels (128 since 6.x); stay under the smaller. */
#define USO_MAX_SEGS 64
#define GRO_MAX_PIECES 64 /* segments per coalesced super-frame */

static const uint8_t vnet_zero[GDP_VNET_LEN];

static inline uint16_t load16le(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

#define ETH_P_IPV4 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_P_VLAN 0x8100
#define ETH_P_TEB 0x6558
#define IP_DF 0x4000
#define IP_MF 0x2000
#define IP_OFFMASK 0x1FFF
#define ECN_MASK 0x03
#define ECN_CE 0x03
#define ECN_ECT0 0x02

/* Receive coalescing (offload mode): consecutive in-order segments of one TCP flow
 * from a batch are merged into one super-frame written with a virtio GSO header, so
 * the kernel's TCP stack handles one packet instead of dozens (what GRO does for a
 * kernel tunnel). Runs of same-sized datagrams of one UDP flow are merged the same
 * way into a UDP_L4 super-frame, which the kernel splits back into the very same
 * datagrams (IP IDs included) after one pass through its IP layer instead of one
 * write, one route lookup and one netfilter traversal each. */
struct gro_state {
    int active;
    uint32_t idx;
    size_t len;
    size_t ip_off, l4, hdrs, mss, last_plen;
    int ipver;
    uint8_t proto; /* 6 (TCP) or 17 (UDP) */
    int psh;
    uint32_t next_seq;
    uint16_t next_id; /* UDP over IPv4: the ID the next datagram must carry */
    uint32_t nseg;
    /* The super-frame is buf[0 .. hdrs) (the first segment's headers, rewritten at
     * flush) followed by the payloads, which stay where recvmmsg put them: piece[i]
     * points into the receive buffers until gro_hold copies them here, before those
     * buffers are reused. So the common case writes straight from where the data was
     * received, with no copy of its own. */
    struct iovec piece[GRO_MAX_PIECES];
    int held; /* the payloads are copied into buf after the headers */
    /* What every merged packet must share beyond its inner headers (RFC 8926 §4.6, as
     * the kernel's GENEVE GRO compares): the whole GENEVE header, options included,
     * and the outer source port (the outer addresses are the tunnel's). */
    uint8_t ghdr[GDP_MAX_HEADER_LEN];
    size_t ghlen;
    uint16_t osport;
    uint8_t buf[GDP_BUF_SIZE];
};

/* The packet a received inner frame came in: its GENEVE header and outer source port. */
struct outer_id {
    const uint8_t *ghdr;
    size_t ghlen;
    uint16_t sport;
};

static int same_outer(const struct gro_state *g, const struct outer_id *o) {
    return g->ghlen == o->ghlen && g->osport == o->sport && !memcmp(g->ghdr, o->ghdr, o->ghlen);
}

/* Transmit coalescing of UDP (with the inject device): datagrams of one flow read from
 * the device in a row, alike but for their IPv4 IDs (which follow on) and with partial
 * checksums, leave as one UDP_L4 super-frame inside one GENEVE packet. The kernel cuts
 * it back into the same datagrams wherever it is segmented, each with all the outer
 * headers; through a veth the peer gets it whole (engine.c rx_super), so a run costs
 * one write and one receive instead of one of each per datagram. */
#define USO_RUNS 4
#define USO_RUN_MAX 64

struct uso_run {
    int active;
    uint32_t idx;   /* tunnel */
    uint8_t *buf;   /* the first datagram's buffer (frame at GDP_HEADROOM) */
    size_t flen;    /* every datagram's frame length */
    size_t ip_off, l4;
    uint16_t next_id;
    uint32_t hash;
    int df;
    uint8_t ecn;
    uint32_t nseg;
    uint8_t *bufs[USO_RUN_MAX];
};

struct gdp_engine {
    struct gdp_engine_config cfg;
    struct gdp_tunnel *tunnels;
    uint32_t n;
    struct gdp_sock_stats *stats;
    uint8_t *rx_bufs;
    uint8_t *tx_bufs;
    uint32_t ip_id;
    uint32_t rr;

    /* receive scratch */
    struct mmsghdr rx_msgs[GDP_BATCH];
    struct iovec rx_iov[GDP_BATCH];
    struct sockaddr_in6 rx_addr[GDP_BATCH];
    uint8_t rx_cmsg[GDP_BATCH][CMSG_BUF] __attribute__((aligned(8)));
    struct gdp_header rx_hdr;
    struct gro_state gro;

    /* transmit scratch: a slot is one outer datagram (a packet or one fragment) */
    struct mmsghdr tx_msgs[TX_SLOTS];
    struct iovec tx_iov[TX_SLOTS][2];
    struct sockaddr_in6 tx_addr[TX_SLOTS];
    uint8_t tx_fraghdr[TX_SLOTS][48];
    /* per-slot headers of a TSO segment: outer IP, UDP, GENEVE, inner headers */
    uint8_t tx_seghdr[TX_SLOTS][SEG_HDR_MAX] __attribute__((aligned(8)));
    struct iovec gso_iov[2 * GSO_MAX_SEGS];
    uint32_t gso_inner[GSO_MAX_SEGS];
    uint32_t tx_tunnel[TX_SLOTS];
    int tx_fd[TX_SLOTS];             /* the raw socket, or a tunnel's connected UDP socket */
    uint8_t tx_cmsg[TX_SLOTS][CMSG_SPACE(sizeof(int))] __attribute__((aligned(8)));
    uint32_t tx_inner_len[TX_SLOTS]; /* set on a packet's last slot only */
    uint8_t tx_last[TX_SLOTS];
    uint8_t icmp[ICMP_BUF];
    uint8_t hdr_scratch[GDP_MAX_HEADER_LEN];
    /* authenticated tunnels: the receive thread's derived keys, and where the
     * transmit thread lays out a segment whole to MAC it */
    uint8_t auth_cache[GDP_AUTH_CACHE_BYTES] __attribute__((aligned(16)));
    uint8_t auth_seg[SEG_HDR_MAX + GDP_FRAME_MAX] __attribute__((aligned(16)));
    uint8_t inj_hdr[24 + 14 + 20 + 8 + GDP_MAX_HEADER_LEN] __attribute__((aligned(8)));
    struct uso_run uso[USO_RUNS];
    uint32_t uso_rr; /* the run to give up next when all are taken */
    uint8_t uso_hdr[SEG_INNER_MAX];
    struct iovec uso_iov[USO_RUN_MAX + 2];
    struct pollfd pfds[GDP_MAX_TUNNELS + 2];
    /* When each tunnel's underlay device was last found up (CLOCK_MONOTONIC ns). */
    uint64_t underlay_seen_up[GDP_MAX_TUNNELS];
};

size_t gdp_engine_size(void) { return sizeof(struct gdp_engine); }

size_t gdp_engine_buffers_size(void) { return (size_t)2 * GDP_BATCH * GDP_BUF_SIZE; }

/* ---------------------------------------------------------------- checksums */

/* One's complement sum of len bytes, added to sum (a big-endian-valued partial sum).
 * The bulk is summed as native 32-bit words (the one's complement sum of byte-swapped
 * words is the byte-swapped sum), folded, and swapped to the big-endian value; the odd
 * tail is added big-endian as before. Loads go through memcpy: no alignment needed. */
static uint64_t csum_partial(const uint8_t *p, size_t len, uint64_t sum) {
    uint64_t acc = 0;
    while (len >= 32) {
        uint64_t w[4];
        memcpy(w, p, 32);
        acc += (w[0] & 0xFFFFFFFFu) + (w[0] >> 32) + (w[1] & 0xFFFFFFFFu) + (w[1] >> 32) +
               (w[2] & 0xFFFFFFFFu) + (w[2] >> 32) + (w[3] & 0xFFFFFFFFu) + (w[3] >> 32);
        p += 32;
        len -= 32;
    }
    while (len >= 4) {
        uint32_t w;
        memcpy(&w, p, 4);
        acc += w;
        p += 4;
        len -= 4;
    }
    while (acc >> 16)
        acc = (acc & 0xFFFF) + (acc >> 16);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    acc = ((acc & 0xFF) << 8) | (acc >> 8);
#endif
    sum += acc;
    if (len >= 2) {
        sum += gdp_load16(p);
        p += 2;
        len -= 2;
    }
    if (len)
        sum += (uint32_t)p[0] << 8;
    return sum;
}

static uint16_t csum_fold(uint64_t sum) {
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (uint16_t)~sum;
}

uint16_t gdp_inet_csum(const uint8_t *buf, size_t len) {
    return csum_fold(csum_partial(buf, len, 0));
}

/* Checksum of an upper-layer message with the IPv4 or IPv6 pseudo header. */
static uint16_t l4_csum(int ipver, const uint8_t *src, const uint8_t *dst, uint8_t proto,
                        const uint8_t *msg, size_t len) {
    size_t alen = ipver == 4 ? 4 : 16;
    uint64_t sum = csum_partial(src, alen, 0);
    sum = csum_partial(dst, alen, sum);
    sum += proto;
    sum += (uint32_t)len;
    return csum_fold(csum_partial(msg, len, sum));
}

/* The one's complement sum, unfolded, of the pseudo header of an upper-layer message
 * of ``len`` bytes in the IPv4 or IPv6 packet at ``ip`` (its addresses). */
static uint64_t pseudo_sum(const uint8_t *ip, int ipver, uint8_t proto, size_t len) {
    return csum_partial(ipver == 4 ? ip + 12 : ip + 8, ipver == 4 ? 8 : 32, 0) + proto +
           (uint32_t)len;
}

/* What a partial checksum field holds (CHECKSUM_PARTIAL, a virtio NEEDS_CSUM frame):
 * the pseudo-header sum, folded, not complemented. */
static uint16_t partial_field(const uint8_t *ip, int ipver, uint8_t proto, size_t len) {
    return (uint16_t)~csum_fold(pseudo_sum(ip, ipver, proto, len));
}

/* ---------------------------------------------------------------- inner parsing */

struct inner {
    int ipver;     /* 4, 6, or 0 for a non-IP frame */
    size_t ip_off; /* where the IP header starts in the frame */
    size_t ip_len; /* bytes from ip_off to the end of the frame */
    uint8_t ecn;
    int df;
    uint8_t proto;
    int ports;
    uint16_t sport, dport;
};

/* Returns 0, or -1 when the frame cannot be a frame of this mode. */
static int parse_inner(const uint8_t *f, size_t len, int mode, struct inner *in) {
    memset(in, 0, sizeof(*in));
    size_t off = 0;
    int ver;
    if (mode == GDP_MODE_TAP) {
        if (len < 14)
            return -1;
        uint16_t type = gdp_load16(f + 12);
        off = 14;
        if (type == ETH_P_VLAN) {
            if (len < 18)
                return 0;
            type = gdp_load16(f + 16);
            off = 18;
        }
        if (type == ETH_P_IPV4)
            ver = 4;
        else if (type == ETH_P_IPV6)
            ver = 6;
        else
            return 0;
        if (len <= off || (f[off] >> 4) != ver)
            return 0; /* claims IP but is not: carried as an opaque frame */
    } else {
        if (len < 1)
            return -1;
        ver = f[0] >> 4;
        if (ver != 4 && ver != 6)
            return -1;
    }
    const uint8_t *ip = f + off;
    size_t left = len - off;
    size_t l4 = 0;
    if (ver == 4) {
        if (left < 20)
            return mode == GDP_MODE_TAP ? 0 : -1;
        size_t ihl = (size_t)(ip[0] & 0x0F) * 4;
        if (ihl < 20 || ihl > left)
            return mode == GDP_MODE_TAP ? 0 : -1;
        uint16_t frag = gdp_load16(ip + 6);
        in->ecn = ip[1] & ECN_MASK;
        in->df = (frag & IP_DF) != 0;
        in->proto = ip[9];
        if ((frag & (IP_MF | IP_OFFMASK)) == 0)
            l4 = ihl;
    } else {
        if (left < 40)
            return mode == GDP_MODE_TAP ? 0 : -1;
        in->ecn = (uint8_t)((gdp_load16(ip) >> 4) & ECN_MASK);
        in->proto = ip[6];
        l4 = 40;
    }
    in->ipver = ver;
    in->ip_off = off;
    in->ip_len = left;
    if (l4 && (in->proto == 6 || in->proto == 17 || in->proto == 132 || in->proto == 136) &&
        left >= l4 + 4) {
        in->ports = 1;
        in->sport = gdp_load16(ip + l4);
        in->dport = gdp_load16(ip + l4 + 2);
    }
    return 0;
}

/* ---------------------------------------------------------------- hashing */

static uint32_t mix(uint32_t h, const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 16777619u;
    }
    return h;
}

static uint32_t finalize(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h;
}

static uint32_t hash_inner(const uint8_t *f, size_t len, const struct inner *in,
                           uint32_t seed) {
    uint32_t h = 2166136261u ^ seed;
    if (in->ipver) {
        const uint8_t *ip = f + in->ip_off;
        size_t alen = in->ipver == 4 ? 4 : 16;
        const uint8_t *src = in->ipver == 4 ? ip + 12 : ip + 8;
        h = mix(h, src, 2 * alen); /* source and destination are adjacent */
        h = mix(h, &in->proto, 1);
        if (in->ports) {
            uint8_t ports[4];
            gdp_store16(ports, in->sport);
            gdp_store16(ports + 2, in->dport);
            h = mix(h, ports, 4);
        }
    } else if (len >= 14) {
        h = mix(h, f, 14); /* non-IP Ethernet: addresses and type */
    }
    return finalize(h);
}

uint32_t gdp_flow_hash(const uint8_t *frame, size_t len, int mode, uint32_t seed) {
    struct inner in;
    if (parse_inner(frame, len, mode, &in) < 0)
        return 0;
    return hash_inner(frame, len, &in, seed);
}

/* The same key for both directions of a flow: the lower endpoint first. */
static size_t flow_key(const uint8_t *f, const struct inner *in, uint8_t *key) {
    const uint8_t *ip = f + in->ip_off;
    size_t alen = in->ipver == 4 ? 4 : 16;
    uint8_t a[18], b[18];
    memcpy(a, in->ipver == 4 ? ip + 12 : ip + 8, alen);
    memcpy(b, in->ipver == 4 ? ip + 16 : ip + 24, alen);
    gdp_store16(a + alen, in->ports ? in->sport : 0);
    gdp_store16(b + alen, in->ports ? in->dport : 0);
    int swap = memcmp(a, b, alen + 2) > 0;
    key[0] = in->proto;
    memcpy(key + 1, swap ? b : a, alen + 2);
    memcpy(key + 1 + alen + 2, swap ? a : b, alen + 2);
    return 1 + 2 * (alen + 2);
}

static struct gdp_reflect_entry *reflect_slot(struct gdp_tunnel *t, const uint8_t *key,
                                              size_t klen) {
    uint32_t h = finalize(mix(2166136261u, key, klen));
    return &t->reflect[h & (t->reflect_slots - 1)];
}

static void reflect_store(struct gdp_tunnel *t, const uint8_t *f, const struct inner *in,
                          const uint8_t *opts, size_t opts_len) {
    uint8_t key[GDP_REFLECT_KEY_LEN];
    size_t klen = flow_key(f, in, key);
    struct gdp_reflect_entry *e = reflect_slot(t, key, klen);
    if (e->key_len == klen && e->opts_len == opts_len && !memcmp(e->key, key, klen) &&
        !memcmp(e->opts, opts, opts_len))
        return; /* unchanged: spare the reader a retry */
    /* Several workers' receive threads may write one table: a writer owns the slot
     * while seq is odd, and one that finds it taken lets this packet go unremembered
     * (the flow's next packet stores it). */
    uint32_t seq = __atomic_load_n(&e->seq, __ATOMIC_RELAXED);
    if ((seq & 1) || !__atomic_compare_exchange_n(&e->seq, &seq, seq + 1, 0, __ATOMIC_ACQUIRE,
                                                  __ATOMIC_RELAXED))
        return;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    e->key_len = (uint8_t)klen;
    e->opts_len = (uint8_t)opts_len;
    memcpy(e->key, key, klen);
    memcpy(e->opts, opts, opts_len);
    __atomic_store_n(&e->seq, seq + 2, __ATOMIC_RELEASE);
}

/* Copies the options remembered for the reverse flow into out; returns their length
 * or 0. */
static size_t reflect_lookup(struct gdp_tunnel *t, const uint8_t *f, const struct inner *in,
                             uint8_t *out) {
    uint8_t key[GDP_REFLECT_KEY_LEN];
    size_t klen = flow_key(f, in, key);
    struct gdp_reflect_entry *e = reflect_slot(t, key, klen);
    for (int tries = 0; tries < 4; tries++) {
        uint32_t s1 = __atomic_load_n(&e->seq, __ATOMIC_ACQUIRE);
        if (s1 & 1)
            continue;
        size_t olen = e->opts_len;
        int match = e->key_len == klen && !memcmp(e->key, key, klen);
        if (match && olen <= GDP_MAX_OPTIONS_LEN)
            memcpy(out, e->opts, olen);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&e->seq, __ATOMIC_RELAXED) == s1)
            return match ? olen : 0;
    }
    return 0;
}

/* ---------------------------------------------------------------- setup */

int gdp_tunnel_prepare(struct gdp_tunnel *t) {
    if ((t->family != 4 && t->family != 6) || (t->mode != GDP_MODE_TAP && t->mode != GDP_MODE_TUN))
        return GDP_E_ENGINE_CONFIG;
    if (t->reflect && (t->reflect_slots == 0 || (t->reflect_slots & (t->reflect_slots - 1))))
        return GDP_E_ENGINE_CONFIG;
    int rc = gdp_encode(t->vni, t->mode == GDP_MODE_TAP ? ETH_P_TEB : ETH_P_IPV4, 0, t->opts,
                        t->opts_len, t->hdr, sizeof(t->hdr));
    if (rc < 0)
        return GDP_E_ENGINE_HEADER;
    t->hdr_len = (uint32_t)rc;
    uint32_t outer = (t->family == 4 ? 20 : 40) + 8 + t->hdr_len;
    if (t->underlay_mtu <= outer + 14)
        return GDP_E_ENGINE_CONFIG;
    t->max_inner = t->underlay_mtu - outer;
    return 0;
}

int gdp_engine_init(struct gdp_engine *e, const struct gdp_engine_config *cfg,
                    struct gdp_tunnel *tunnels, uint32_t n, uint8_t *bufs,
                    size_t bufs_len, struct gdp_sock_stats *stats) {
    if (n == 0 || n > GDP_MAX_TUNNELS)
        return GDP_E_ENGINE_TOO_MANY;
    if (bufs_len < gdp_engine_buffers_size())
        return GDP_E_ENGINE_BUFFER;
    if (cfg->sport_min == 0 || cfg->sport_max < cfg->sport_min)
        return GDP_E_ENGINE_CONFIG;
    for (uint32_t i = 0; i < n; i++)
        if (tunnels[i].family != cfg->family || tunnels[i].hdr_len == 0)
            return GDP_E_ENGINE_CONFIG;
    memset(e, 0, sizeof(*e));
    e->cfg = *cfg;
    e->tunnels = tunnels;
    e->n = n;
    e->stats = stats;
    e->rx_bufs = bufs;
    e->tx_bufs = bufs + (size_t)GDP_BATCH * GDP_BUF_SIZE;
    e->ip_id = cfg->ip_id_start;
    return 0;
}

/* ---------------------------------------------------------------- receive */

static void count_options(struct gdp_tunnel *t, const struct gdp_header *h) {
    for (uint32_t i = 0; i < h->n_options; i++) {
        const struct gdp_option *o = &h->options[i];
        struct gdp_optseen *free_slot = NULL;
        int found = 0;
        for (int s = 0; s < GDP_OPTSEEN_SLOTS; s++) {
            struct gdp_optseen *q = &t->counters.options_seen[s];
            if (!q->used) {
                free_slot = q;
                break; /* slots fill in order: the first free one ends the search */
            }
            if (q->opt_class == o->opt_class && q->type == o->type) {
                q->count++;
                found = 1;
                break;
            }
        }
        if (found)
            continue;
        if (free_slot) {
            free_slot->opt_class = o->opt_class;
            free_slot->type = o->type;
            free_slot->count = 1;
            __atomic_store_n(&free_slot->used, 1, __ATOMIC_RELEASE);
        } else {
            t->counters.options_other++;
        }
    }
}

/* RFC 6040 decapsulation: outer CE marks an ECN-capable inner packet CE and drops a
 * Not-ECT one. Returns 0 to deliver, -1 to drop. */
static int ecn_decap(uint8_t *f, const struct inner *in, uint8_t outer_tos) {
    if ((outer_tos & ECN_MASK) != ECN_CE || !in->ipver)
        return 0;
    if (in->ecn == 0)
        return -1;
    if (in->ecn == ECN_CE)
        return 0;
    uint8_t *ip = f + in->ip_off;
    if (in->ipver == 4) {
        /* Incremental checksum update (RFC 1624) for the changed TOS word. */
        uint16_t old = gdp_load16(ip);
        uint16_t new = (uint16_t)(old | ECN_CE);
        uint32_t sum = (uint16_t)~gdp_load16(ip + 10);
        sum += (uint16_t)~old;
        sum += new;
        while (sum >> 16)
            sum = (sum & 0xFFFF) + (sum >> 16);
        ip[1] |= ECN_CE;
        gdp_store16(ip + 10, (uint16_t)~sum);
    } else {
        ip[1] |= ECN_CE << 4;
    }
    return 0;
}

/* Write a frame to the tunnel's device, behind an all-zero virtio header when the
 * device has one (no offload claimed: the kernel checks the inner checksums). */
static ssize_t dev_write(struct gdp_tunnel *t, const uint8_t *f, size_t len) {
    if (!t->vnet_hdr)
        return write(t->dev_fd, f, len);
    struct iovec iov[2] = {{(void *)vnet_zero, GDP_VNET_LEN}, {(void *)f, len}};
    ssize_t r = writev(t->dev_fd, iov, 2);
    return r < 0 ? r : r - GDP_VNET_LEN;
}

static void send_control(struct gdp_engine *e, uint32_t idx, const uint8_t *pkt, size_t len) {
    struct gdp_tunnel *t = &e->tunnels[idx];
    t->counters.control++;
    if (e->cfg.control_fd < 0)
        return;
    uint8_t tag[4];
    gdp_store32(tag, e->cfg.control_tag | idx);
    struct iovec iov[2] = {{tag, 4}, {(void *)pkt, len}};
    struct msghdr m = {.msg_iov = iov, .msg_iovlen = 2};
    if (sendmsg(e->cfg.control_fd, &m, MSG_DONTWAIT) < 0)
        t->counters.drops[GDP_DROP_CONTROL_QUEUE_FULL]++;
}

/* Write out the coalesced super-frame, if any. */
/* Where the L4 header of an IP packet with no IPv4 options and no IPv6 extension
 * headers starts, if the IP length covers exactly the rest of the frame (no link
 * padding); 0 for anything else, which is never coalesced. */
static size_t plain_l4(const uint8_t *f, const struct inner *in) {
    const uint8_t *ip = f + in->ip_off;
    if (in->ipver == 4)
        return ip[0] == 0x45 && gdp_load16(ip + 2) == in->ip_len ? in->ip_off + 20 : 0;
    return (size_t)gdp_load16(ip + 4) + 40 == in->ip_len ? in->ip_off + 40 : 0;
}

/* Whether a TCP or UDP message checksums right (its checksum field included). */
static int l4_valid(const uint8_t *ip, int ipver, uint8_t proto, const uint8_t *msg,
                    size_t len) {
    return l4_csum(ipver, ipver == 4 ? ip + 12 : ip + 8, ipver == 4 ? ip + 16 : ip + 24, proto,
                   msg, len) == 0;
}

/* Two IP headers that differ only where merging or splitting rewrites them: IPv4
 * length, ID and checksum, IPv6 payload length. */
static int same_ip(const uint8_t *a, const uint8_t *b, int ipver) {
    return ipver == 4 ? !memcmp(a, b, 2) && !memcmp(a + 6, b + 6, 4) && !memcmp(a + 12, b + 12, 8)
                      : !memcmp(a, b, 4) && !memcmp(a + 6, b + 6, 34);
}

/* Copy the payloads of a super-frame in the making into its own buffer: the receive
 * buffers they sit in are about to be reused. */
static void gro_hold(struct gdp_engine *e) {
    struct gro_state *g = &e->gro;
    if (!g->active || g->held)
        return;
    size_t off = g->hdrs;
    for (uint32_t i = 0; i < g->nseg; i++) {
        memmove(g->buf + off, g->piece[i].iov_base, g->piece[i].iov_len);
        g->piece[i].iov_base = g->buf + off;
        off += g->piece[i].iov_len;
    }
    g->held = 1;
}

/* Write out the coalesced super-frame, if any. */
static void gro_flush(struct gdp_engine *e) {
    struct gro_state *g = &e->gro;
    if (!g->active)
        return;
    g->active = 0;
    struct gdp_tunnel *t = &e->tunnels[g->idx];
    struct iovec iov[GRO_MAX_PIECES + 2];
    uint8_t vh[GDP_VNET_LEN] = {0};
    iov[0].iov_base = vh;
    iov[0].iov_len = GDP_VNET_LEN;
    iov[1].iov_base = g->buf;
    iov[1].iov_len = g->hdrs;
    memcpy(iov + 2, g->piece, g->nseg * sizeof(struct iovec));
    int n = 2 + (int)g->nseg; /* coalescing runs only on devices with a virtio header */
    if (g->nseg == 1) {
        /* Nothing merged: the segment is as received, checksum included (a zero
         * virtio header claims no offload). */
        if (writev(t->dev_fd, iov, n) != (ssize_t)(GDP_VNET_LEN + g->len))
            t->counters.drops[GDP_DROP_DEV_WRITE]++;
        return;
    }
    uint8_t *ip = g->buf + g->ip_off;
    if (g->ipver == 4) {
        gdp_store16(ip + 2, (uint16_t)(g->len - g->ip_off));
        gdp_store16(ip + 10, 0);
        gdp_store16(ip + 10, gdp_inet_csum(ip, 20));
    } else {
        gdp_store16(ip + 4, (uint16_t)(g->len - g->ip_off - 40));
    }
    int udp = g->proto == 17;
    size_t csum_off = udp ? 6 : 16;
    if (udp)
        gdp_store16(g->buf + g->l4 + 4, (uint16_t)(g->len - g->l4));
    /* Partial checksum, as a virtio device hands it over: the field holds the
     * pseudo-header sum and the kernel treats the payload as verified (each segment's
     * checksum was checked before it was merged). */
    gdp_store16(g->buf + g->l4 + csum_off, partial_field(ip, g->ipver, g->proto, g->len - g->l4));
    vh[0] = VNET_F_NEEDS_CSUM;
    vh[1] = udp ? VNET_GSO_UDP_L4 : g->ipver == 4 ? VNET_GSO_TCPV4 : VNET_GSO_TCPV6;
    vh[2] = (uint8_t)g->hdrs;
    vh[3] = (uint8_t)(g->hdrs >> 8);
    vh[4] = (uint8_t)g->mss;
    vh[5] = (uint8_t)(g->mss >> 8);
    vh[6] = (uint8_t)g->l4;
    vh[7] = (uint8_t)(g->l4 >> 8);
    vh[8] = (uint8_t)csum_off;
    if (writev(t->dev_fd, iov, n) != (ssize_t)(GDP_VNET_LEN + g->len))
        t->counters.drops[GDP_DROP_DEV_WRITE]++;
    else
        t->counters.rx_gro_frames++;
}

/* Start a super-frame with this segment: its headers copied, its payload in place. */
static void gro_start(struct gdp_engine *e, uint32_t idx, const uint8_t *f, size_t flen,
                      const struct inner *in, uint8_t proto, size_t l4, size_t hdrs,
                      const struct outer_id *o) {
    struct gro_state *g = &e->gro;
    gro_flush(e);
    g->ip_off = in->ip_off;
    g->ipver = in->ipver;
    g->proto = proto;
    g->l4 = l4;
    memcpy(g->ghdr, o->ghdr, o->ghlen);
    g->ghlen = o->ghlen;
    g->osport = o->sport;
    memcpy(g->buf, f, hdrs);
    g->piece[0].iov_base = (void *)(f + hdrs);
    g->piece[0].iov_len = flen - hdrs;
    g->held = 0;
    g->active = 1;
    g->idx = idx;
    g->len = flen;
    g->hdrs = hdrs;
    g->mss = flen - hdrs;
    g->last_plen = flen - hdrs;
    g->nseg = 1;
}

/* Append a segment's payload (in place, or copied if the frame is held). */
static void gro_append(struct gro_state *g, const uint8_t *p, size_t plen) {
    struct iovec *v = &g->piece[g->nseg];
    if (g->held) {
        memcpy(g->buf + g->len, p, plen);
        v->iov_base = g->buf + g->len;
    } else {
        v->iov_base = (void *)p;
    }
    v->iov_len = plen;
    g->len += plen;
    g->last_plen = plen;
    g->nseg++;
}

/* Take a received inner frame into the coalescing buffer; returns 0 when the frame is
 * not a plain TCP data segment (the caller then writes it as it is). */
static int gro_add_udp(struct gdp_engine *e, uint32_t idx, const uint8_t *f, size_t flen,
                       const struct inner *in, const struct outer_id *o);

static int gro_add(struct gdp_engine *e, uint32_t idx, const uint8_t *f, size_t flen,
                   const struct inner *in, const struct outer_id *o) {
    if (in->ipver && in->proto == 17 && in->ports && e->tunnels[idx].rx_uso)
        return gro_add_udp(e, idx, f, flen, in, o);
    if (!in->ipver || in->proto != 6 || !in->ports)
        return 0;
    const uint8_t *ip = f + in->ip_off;
    size_t l4 = plain_l4(f, in);
    if (!l4)
        return 0;
    const uint8_t *tcp = f + l4;
    size_t doff = (size_t)(tcp[12] >> 4) * 4;
    size_t hdrs = l4 + doff;
    uint8_t flags = tcp[13];
    if (doff < 20 || hdrs >= flen || hdrs > SEG_INNER_MAX || (flags & ~0x18) || !(flags & 0x10))
        return 0; /* only ACK (+PSH) segments that carry data */
    if (!l4_valid(ip, in->ipver, 6, tcp, flen - l4))
        return 0; /* a bad checksum: let the kernel see (and count) it */
    size_t plen = flen - hdrs;
    uint32_t seq = gdp_load32(tcp + 4);
    struct gro_state *g = &e->gro;
    if (g->active && g->proto == 6 && g->idx == idx && g->ipver == in->ipver &&
        g->hdrs == hdrs && g->l4 == l4 && g->ip_off == in->ip_off && !g->psh &&
        g->next_seq == seq && g->nseg < GRO_MAX_PIECES &&
        g->last_plen == g->mss && plen <= g->mss && g->len + plen <= 65000) {
        const uint8_t *gip = g->buf + g->ip_off;
        const uint8_t *gtcp = g->buf + l4;
        int same = same_ip(gip, ip, in->ipver);
        same = same && !memcmp(gtcp, tcp, 4) && !memcmp(gtcp + 8, tcp + 8, 5) &&
               !memcmp(gtcp + 14, tcp + 14, 2) && !memcmp(gtcp + 18, tcp + 18, doff - 18) &&
               !memcmp(g->buf, f, in->ip_off) && same_outer(g, o);
        if (same) {
            gro_append(g, f + hdrs, plen);
            g->next_seq += (uint32_t)plen;
            if (flags & 0x08) {
                g->buf[l4 + 13] |= 0x08;
                g->psh = 1;
            }
            return 1;
        }
    }
    gro_start(e, idx, f, flen, in, 6, l4, hdrs, o);
    g->psh = (flags & 0x08) != 0;
    g->next_seq = seq + (uint32_t)plen;
    return 1;
}

/* The UDP half of gro_add: merge a datagram into a run of same-sized datagrams of its
 * flow whose headers differ only where segmentation rewrites them (lengths, IPv4 ID
 * counting up by one, checksums), so splitting gives back exactly what arrived. */
static int gro_add_udp(struct gdp_engine *e, uint32_t idx, const uint8_t *f, size_t flen,
                       const struct inner *in, const struct outer_id *o) {
    const uint8_t *ip = f + in->ip_off;
    size_t l4 = plain_l4(f, in);
    if (!l4)
        return 0;
    const uint8_t *uh = f + l4;
    size_t hdrs = l4 + 8;
    if (hdrs >= flen || gdp_load16(uh + 4) != flen - l4)
        return 0; /* no payload, or a length that disagrees with IP's */
    uint16_t cs = gdp_load16(uh + 6);
    if (cs == 0 && in->ipver == 6)
        return 0; /* invalid over IPv6: the kernel decides (and counts) */
    if (cs != 0 && !l4_valid(ip, in->ipver, 17, uh, flen - l4))
        return 0; /* a bad checksum: let the kernel see (and count) it */
    size_t plen = flen - hdrs;
    uint16_t id = in->ipver == 4 ? gdp_load16(ip + 4) : 0;
    struct gro_state *g = &e->gro;
    if (g->active && g->proto == 17 && g->idx == idx && g->ipver == in->ipver &&
        g->ip_off == in->ip_off && g->last_plen == g->mss && plen <= g->mss &&
        g->nseg < USO_MAX_SEGS && g->len + plen <= 65000 &&
        (in->ipver == 6 || id == g->next_id)) {
        const uint8_t *gip = g->buf + g->ip_off;
        int same = same_ip(gip, ip, in->ipver);
        same = same && !memcmp(g->buf + l4, uh, 4) && !memcmp(g->buf, f, in->ip_off) &&
               same_outer(g, o);
        if (same) {
            gro_append(g, f + hdrs, plen);
            g->next_id = (uint16_t)(id + 1);
            return 1;
        }
    }
    gro_start(e, idx, f, flen, in, 17, l4, hdrs, o);
    g->psh = 0;
    g->next_id = (uint16_t)(id + 1);
    return 1;
}

/* The length the IP header at ``ip`` gives its packet. */
static size_t ip_total(const uint8_t *ip, int ipver) {
    return ipver == 4 ? gdp_load16(ip + 2) : 40 + (size_t)gdp_load16(ip + 4);
}

/* Whether the L4 checksum field holds just the pseudo-header sum over ``len`` bytes
 * (0 and 0xFFFF are the same one's complement sum). */
static int partial_csum(const uint8_t *ip, int ipver, uint8_t proto, size_t len, uint16_t field) {
    uint16_t partial = partial_field(ip, ipver, proto, len);
    return field == partial || ((field == 0 || field == 0xFFFF) && (partial == 0 || partial == 0xFFFF));
}

/* A GSO super-packet of this host's own stack (a peer's inject device, through a
 * veth) arrives as one datagram that was neither reassembled from fragments nor
 * batched by UDP GRO. Its inner frame is a super-frame whose checksum field holds only
 * the pseudo-header sum, to be completed by whoever segments it:
 * - TCP: longer than one underlay packet could carry; the MSS is taken from the device
 *   MTU (the sender's segment size is not carried, and TCP is a stream);
 * - UDP: the UDP length is one datagram's (8 + segment size) while the IP packet holds
 *   several: the segment size is carried, as the datagram boundaries must be kept.
 * Returns 0, touching nothing, when the frame is not one. Written to a device with a
 * virtio header as one GSO frame; TCP without one as one large packet with its
 * checksum completed here (the kernel's TCP takes that as well). */
static int rx_super(struct gdp_engine *e, struct gdp_tunnel *t, uint8_t *f, size_t flen,
                    const struct inner *in) {
    if (!in->ipver || (in->proto != 6 && in->proto != 17) || !in->ports)
        return 0;
    uint8_t *ip = f + in->ip_off;
    size_t l4 = in->ip_off + (in->ipver == 4 ? (size_t)(ip[0] & 0x0F) * 4 : 40);
    if (in->ip_off + ip_total(ip, in->ipver) != flen)
        return 0;
    int udp = in->proto == 17;
    size_t hdrs, seg, ulen = 0;
    if (udp) {
        if (!t->rx_uso || l4 + 8 > flen)
            return 0;
        ulen = gdp_load16(f + l4 + 4);
        hdrs = l4 + 8;
        if (ulen <= 8 || l4 + ulen >= flen || !partial_csum(ip, in->ipver, 17, ulen, gdp_load16(f + l4 + 6)))
            return 0;
        seg = ulen - 8;
    } else {
        if (flen <= t->max_inner || l4 + 20 > flen)
            return 0;
        hdrs = l4 + (size_t)(f[l4 + 12] >> 4) * 4;
        if (hdrs < l4 + 20 || hdrs >= flen ||
            !partial_csum(ip, in->ipver, 6, flen - l4, gdp_load16(f + l4 + 16)))
            return 0;
        size_t l3hdrs = hdrs - in->ip_off;
        seg = t->dev_mtu > l3hdrs ? t->dev_mtu - l3hdrs : 0;
    }
    gro_flush(e); /* what came before it goes first */
    size_t payload = flen - hdrs;
    size_t nseg = seg ? (payload + seg - 1) / seg : 1;
    struct gdp_counters *c = &t->counters;
    ssize_t want = (ssize_t)flen;
    ssize_t r;
    if (t->vnet_hdr) {
        uint8_t vh[GDP_VNET_LEN] = {0};
        vh[0] = VNET_F_NEEDS_CSUM;
        if (udp) {
            /* The kernel's UDP takes the length as the whole frame's and splits it at
             * the segment size, fixing each datagram's length and checksum. */
            gdp_store16(f + l4 + 4, (uint16_t)(flen - l4));
            gdp_store16(f + l4 + 6, partial_field(ip, in->ipver, 17, flen - l4));
            vh[1] = VNET_GSO_UDP_L4;
        } else if (seg && payload > seg) {
            vh[1] = in->ipver == 4 ? VNET_GSO_TCPV4 : VNET_GSO_TCPV6;
            if (f[l4 + 13] & 0x80) /* CWR */
                vh[1] |= VNET_GSO_ECN;
        }
        if (vh[1]) {
            vh[2] = (uint8_t)hdrs;
            vh[3] = (uint8_t)(hdrs >> 8);
            vh[4] = (uint8_t)seg;
            vh[5] = (uint8_t)(seg >> 8);
        }
        vh[6] = (uint8_t)l4;
        vh[7] = (uint8_t)(l4 >> 8);
        vh[8] = udp ? 6 : 16;
        struct iovec iov[2] = {{vh, GDP_VNET_LEN}, {f, flen}};
        want += GDP_VNET_LEN;
        r = writev(t->dev_fd, iov, 2);
    } else {
        uint16_t cs = csum_fold(csum_partial(f + l4, flen - l4, 0));
        gdp_store16(f + l4 + 16, cs ? cs : 0xFFFF);
        r = write(t->dev_fd, f, flen);
    }
    if (r != want) {
        c->rx_packets--; /* counted by the caller */
        c->rx_bytes -= flen;
        c->drops[GDP_DROP_DEV_WRITE]++;
        return 1;
    }
    c->rx_packets += nseg - 1;
    c->rx_bytes += (nseg - 1) * hdrs; /* each segment's inner frame, as the sender counts */
    c->rx_gro_frames++;
    return 1;
}

static void rx_one(struct gdp_engine *e, uint8_t *pkt, size_t len,
                   const struct sockaddr_in6 *from, uint8_t outer_tos, int whole) {
    struct gdp_sock_stats *ss = e->stats;
    struct gdp_header *h = &e->rx_hdr;
    int rc = gdp_decode(pkt, len, h);
    if (rc < 0) {
        static const int reason[] = {0, GDP_DROP_TRUNCATED, GDP_DROP_BAD_VERSION,
                                     GDP_DROP_OPTIONS_TRUNCATED, GDP_DROP_OPTION_OVERRUNS};
        ss->drops[-rc >= 1 && -rc <= 4 ? reason[-rc] : GDP_DROP_TRUNCATED]++;
        return;
    }
    const uint8_t *src;
    size_t alen;
    if (e->cfg.family == 4) {
        src = (const uint8_t *)&((const struct sockaddr_in *)from)->sin_addr;
        alen = 4;
    } else {
        src = (const uint8_t *)&from->sin6_addr;
        alen = 16;
    }
    uint32_t idx = e->n;
    int vni_seen = 0;
    for (uint32_t i = 0; i < e->n; i++) {
        if (e->tunnels[i].vni != h->vni)
            continue;
        vni_seen = 1;
        if (!memcmp(e->tunnels[i].remote, src, alen)) {
            idx = i;
            break;
        }
    }
    if (idx == e->n) {
        ss->drops[vni_seen ? GDP_DROP_WRONG_REMOTE : GDP_DROP_UNKNOWN_VNI]++;
        return;
    }
    struct gdp_tunnel *t = &e->tunnels[idx];
    struct gdp_counters *c = &t->counters;
    if (h->n_options)
        count_options(t, h);
    /* The integrity check comes first: nothing acts on a packet not known to come
     * from the peer. Its option is the one critical option we know. */
    size_t auth_off = 0;
    if (t->auth) {
        int arc = gdp_auth_verify(t->auth, (struct gdp_auth_cache *)e->auth_cache, pkt, len,
                                  &auth_off);
        if (arc != GDP_AUTH_OK) {
            c->drops[GDP_DROP_AUTH_MISSING + arc - GDP_AUTH_MISSING]++;
            return;
        }
    }
    int critical = 0, unknown = 0;
    for (uint32_t i = 0; i < h->n_options; i++) {
        int crit = (h->options[i].type & 0x80) != 0;
        critical |= crit;
        unknown |= crit && !(t->auth && h->options[i].data_offset == auth_off + 4);
    }
    if (critical != h->critical) {
        c->drops[GDP_DROP_C_BIT_MISMATCH]++;
        return;
    }
    if (unknown) {
        c->drops[GDP_DROP_CRITICAL_OPTION]++;
        return;
    }
    if (h->oam) {
        send_control(e, idx, pkt, len);
        return;
    }
    uint16_t proto = h->protocol;
    if (t->mode == GDP_MODE_TAP ? proto != ETH_P_TEB : proto != ETH_P_IPV4 && proto != ETH_P_IPV6) {
        c->drops[GDP_DROP_WRONG_PROTOCOL]++;
        return;
    }
    uint8_t *f = pkt + rc;
    size_t flen = len - (size_t)rc;
    struct inner in;
    if (parse_inner(f, flen, t->mode, &in) < 0) {
        c->drops[GDP_DROP_INNER_TRUNCATED]++;
        return;
    }
    if (t->mode == GDP_MODE_TUN && in.ipver != (proto == ETH_P_IPV4 ? 4 : 6)) {
        c->drops[GDP_DROP_WRONG_PROTOCOL]++;
        return;
    }
    if (t->mode == GDP_MODE_TAP && !memcmp(f + 6, t->mac, 6)) {
        c->drops[GDP_DROP_OWN_MAC]++;
        return;
    }
    if (ecn_decap(f, &in, outer_tos) < 0) {
        c->drops[GDP_DROP_ECN_NOT_ECT]++;
        return;
    }
    if (t->reflect && h->opt_len && in.ipver) {
        const uint8_t *opts = pkt + GDP_BASE_HEADER_LEN;
        size_t olen = (size_t)h->opt_len * 4;
        uint8_t kept[GDP_MAX_OPTIONS_LEN];
        if (t->auth) { /* the peer's integrity option is not reflected */
            size_t at = auth_off - GDP_BASE_HEADER_LEN;
            memcpy(kept, opts, at);
            memcpy(kept + at, opts + at + GDP_AUTH_OPT_LEN, olen - at - GDP_AUTH_OPT_LEN);
            opts = kept;
            olen -= GDP_AUTH_OPT_LEN;
        }
        if (olen)
            reflect_store(t, f, &in, opts, olen);
    }
    c->rx_packets++;
    c->rx_bytes += flen;
    if (whole && rx_super(e, t, f, flen, &in))
        return;
    struct outer_id o = {pkt, (size_t)rc, from->sin6_port}; /* sin_port: same place */
    if (t->vnet_hdr && gro_add(e, idx, f, flen, &in, &o))
        return;
    gro_flush(e);
    if (dev_write(t, f, flen) != (ssize_t)flen) {
        c->rx_packets--;
        c->rx_bytes -= flen;
        c->drops[GDP_DROP_DEV_WRITE]++;
    }
}

/* The outer TOS of a received datagram; also its UDP GRO segment size (0: none) and
 * whether it was reassembled from fragments (IP_RECVFRAGSIZE reports those only). */
static uint8_t cmsg_tos(struct msghdr *m, struct gdp_sock_stats *ss, size_t *gro_size,
                        int *reassembled) {
    uint8_t tos = 0;
    *gro_size = 0;
    *reassembled = 0;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(m); cm; cm = CMSG_NXTHDR(m, cm)) {
        if ((cm->cmsg_level == IPPROTO_IP && cm->cmsg_type == IP_RECVFRAGSIZE_OPT) ||
            (cm->cmsg_level == IPPROTO_IPV6 && cm->cmsg_type == IPV6_RECVFRAGSIZE_OPT)) {
            *reassembled = 1;
            continue;
        }
        if (cm->cmsg_level == SOL_UDP && cm->cmsg_type == UDP_GRO_OPT &&
            cm->cmsg_len >= CMSG_LEN(sizeof(int))) {
            int v;
            memcpy(&v, CMSG_DATA(cm), sizeof(v));
            *gro_size = v > 0 ? (size_t)v : 0;
            continue;
        }
        if (cm->cmsg_level == IPPROTO_IP && cm->cmsg_type == IP_TOS &&
            cm->cmsg_len >= CMSG_LEN(1)) {
            tos = *CMSG_DATA(cm);
        } else if (cm->cmsg_level == IPPROTO_IPV6 && cm->cmsg_type == IPV6_TCLASS &&
                   cm->cmsg_len >= CMSG_LEN(sizeof(int))) {
            int v;
            memcpy(&v, CMSG_DATA(cm), sizeof(v));
            tos = (uint8_t)v;
        } else if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SO_RXQ_OVFL &&
                   cm->cmsg_len >= CMSG_LEN(sizeof(uint32_t))) {
            uint32_t v;
            memcpy(&v, CMSG_DATA(cm), sizeof(v));
            ss->rx_queue_overflow = v;
        }
    }
    return tos;
}

/* Whether a UDP GRO datagram is one GENEVE packet after all: a super-packet whose
 * inner frame is a UDP_L4 super-frame, for which the kernel reports the inner
 * segment size (the inner IP length then spans the whole datagram). */
static int one_packet(const uint8_t *p, size_t len) {
    if (len < GDP_BASE_HEADER_LEN)
        return 0;
    size_t off = GDP_BASE_HEADER_LEN + (size_t)(p[0] & 0x3F) * 4;
    uint16_t proto = gdp_load16(p + 2);
    int tap = proto == ETH_P_TEB;
    struct inner in;
    if (off >= len || (!tap && proto != ETH_P_IPV4 && proto != ETH_P_IPV6) ||
        parse_inner(p + off, len - off, tap ? GDP_MODE_TAP : GDP_MODE_TUN, &in) < 0 || !in.ipver)
        return 0;
    return in.ip_off + ip_total(p + off + in.ip_off, in.ipver) == len - off;
}

/* Drain the UDP socket; returns 0, or -errno on a hard error. */
static int rx_batch(struct gdp_engine *e) {
    for (int rounds = 0; rounds < 64; rounds++) {
        for (int i = 0; i < GDP_BATCH; i++) {
            struct msghdr *m = &e->rx_msgs[i].msg_hdr;
            e->rx_iov[i].iov_base = e->rx_bufs + (size_t)i * GDP_BUF_SIZE;
            e->rx_iov[i].iov_len = GDP_BUF_SIZE;
            m->msg_iov = &e->rx_iov[i];
            m->msg_iovlen = 1;
            m->msg_name = &e->rx_addr[i];
            m->msg_namelen = sizeof(e->rx_addr[i]);
            m->msg_control = e->rx_cmsg[i];
            m->msg_controllen = CMSG_BUF;
            m->msg_flags = 0;
        }
        gro_hold(e); /* its payloads may sit in the buffers this call refills */
        int n = recvmmsg(e->cfg.udp_fd, e->rx_msgs, GDP_BATCH, MSG_DONTWAIT, NULL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                break;
            if (errno == ECONNREFUSED || errno == ENOBUFS || errno == ENOMEM)
                continue; /* transient: ICMP errors queued on the socket */
            int err = errno;
            gro_flush(e);
            return -err;
        }
        for (int i = 0; i < n; i++) {
            struct msghdr *m = &e->rx_msgs[i].msg_hdr;
            size_t gro_size;
            int reassembled;
            uint8_t tos = cmsg_tos(m, e->stats, &gro_size, &reassembled);
            size_t len = e->rx_msgs[i].msg_len;
            if (m->msg_flags & MSG_TRUNC)
                len = 0; /* cannot happen with 64 KiB buffers; never forward a part */
            uint8_t *p = e->rx_iov[i].iov_base;
            if (gro_size == 0 || gro_size >= len || one_packet(p, len)) {
                e->stats->rx_packets++;
                rx_one(e, p, len, &e->rx_addr[i], tos, !reassembled);
                continue;
            }
            /* UDP_GRO: the kernel handed over several same-sized datagrams at once. */
            for (size_t off = 0; off < len; off += gro_size) {
                e->stats->rx_packets++;
                rx_one(e, p + off, len - off < gro_size ? len - off : gro_size, &e->rx_addr[i],
                       tos, 0);
            }
        }
        if (n < GDP_BATCH)
            break;
        /* A full batch: more is waiting, so a super-frame being built may grow on. */
    }
    gro_flush(e); /* never held across a wait for the next packets */
    return 0;
}

/* ---------------------------------------------------------------- transmit */

struct tx_state {
    int slots; /* used transmit slots */
    int bufs;  /* used transmit buffers */
    int done;  /* the frame just read was sent whole: its buffer is free again */
};

static void tx_send(struct gdp_engine *e, struct tx_state *st) {
    int done = 0;
    int waits = 0;
    while (done < st->slots) {
        /* One sendmmsg per run of slots bound for the same socket. */
        int fd = e->tx_fd[done];
        int end = done + 1;
        while (end < st->slots && e->tx_fd[end] == fd)
            end++;
        int r = sendmmsg(fd, e->tx_msgs + done, (unsigned)(end - done), 0);
        if (r > 0) {
            for (int i = done; i < done + r; i++)
                if (e->tx_last[i]) {
                    struct gdp_counters *c = &e->tunnels[e->tx_tunnel[i]].counters;
                    c->tx_packets++;
                    c->tx_bytes += e->tx_inner_len[i];
                }
            done += r;
            continue;
        }
        if ((errno == EAGAIN || errno == ENOBUFS) && waits < 10) {
            /* The socket's send buffer is full: wait for room rather than drop. */
            struct pollfd p = {fd, POLLOUT, 0};
            poll(&p, 1, 10);
            waits++;
            continue;
        }
        if (errno == ECONNREFUSED && fd != e->cfg.raw_fd && waits < 10) {
            waits++; /* an ICMP error reported on the connected socket: now cleared */
            continue;
        }
        if (errno == EINTR)
            continue;
        /* This datagram failed: drop its whole packet, count it once. */
        e->tunnels[e->tx_tunnel[done]].counters.drops[GDP_DROP_TX_ERROR]++;
        while (done < st->slots && !e->tx_last[done])
            done++;
        done++;
    }
    st->slots = 0;
}

static void tx_flush(struct gdp_engine *e, struct tx_state *st) {
    tx_send(e, st);
    st->bufs = 0;
}

static void add_slot(struct gdp_engine *e, struct tx_state *st, uint32_t idx, uint8_t *h,
                     size_t hlen, uint8_t *d, size_t dlen, uint32_t inner_len, int last) {
    struct gdp_tunnel *t = &e->tunnels[idx];
    if (st->slots >= TX_SLOTS)
        tx_send(e, st);
    int s = st->slots++;
    struct sockaddr_in6 *a = &e->tx_addr[s];
    memset(a, 0, sizeof(*a));
    socklen_t alen;
    if (t->family == 4) {
        struct sockaddr_in *a4 = (struct sockaddr_in *)a;
        a4->sin_family = AF_INET;
        memcpy(&a4->sin_addr, t->remote, 4);
        alen = sizeof(*a4);
    } else {
        a->sin6_family = AF_INET6;
        memcpy(&a->sin6_addr, t->remote, 16);
        alen = sizeof(*a);
    }
    e->tx_iov[s][0].iov_base = h;
    e->tx_iov[s][0].iov_len = hlen;
    e->tx_iov[s][1].iov_base = d;
    e->tx_iov[s][1].iov_len = dlen;
    struct msghdr *m = &e->tx_msgs[s].msg_hdr;
    memset(m, 0, sizeof(*m));
    m->msg_name = a;
    m->msg_namelen = alen;
    m->msg_iov = e->tx_iov[s];
    m->msg_iovlen = dlen ? 2 : 1;
    e->tx_fd[s] = e->cfg.raw_fd;
    e->tx_tunnel[s] = idx;
    e->tx_inner_len[s] = last ? inner_len : 0;
    e->tx_last[s] = (uint8_t)last;
}

/* The outer TOS without ECN bits: what the tunnel's UDP sockets are set to. */
static uint8_t socket_tos(const struct gdp_tunnel *t) {
    return (uint8_t)(t->tos_set ? t->tos & ~ECN_MASK : 0);
}

/* The outer TOS of a packet: RFC 6040 normal mode copies the inner ECN, except that CE
 * goes out as ECT(0). */
static uint8_t tx_tos(const struct gdp_tunnel *t, uint8_t inner_ecn) {
    return (uint8_t)(socket_tos(t) | (inner_ecn == ECN_CE ? ECN_ECT0 : inner_ecn));
}

/* A whole GENEVE packet (g, glen) for the tunnel's connected UDP socket of this flow:
 * the kernel writes UDP and IP and routes by the socket's cached route, which is
 * cheaper per packet than the raw socket's route lookup. Only where the checksum is 0
 * (SO_NO_CHECK), so nothing is left to a checksum offload. */
static void add_udp_slot(struct gdp_engine *e, struct tx_state *st, uint32_t idx, uint32_t hash,
                         uint8_t tos, uint8_t *g, size_t glen, uint32_t inner_len) {
    struct gdp_tunnel *t = &e->tunnels[idx];
    if (st->slots >= TX_SLOTS)
        tx_send(e, st);
    int s = st->slots++;
    e->tx_iov[s][0].iov_base = g;
    e->tx_iov[s][0].iov_len = glen;
    struct msghdr *m = &e->tx_msgs[s].msg_hdr;
    memset(m, 0, sizeof(*m));
    m->msg_iov = e->tx_iov[s];
    m->msg_iovlen = 1;
    /* An IP-level cmsg costs a route lookup: only when ECN bits make the TOS differ
     * from the one set on the socket. */
    if (tos != socket_tos(t)) {
        memset(e->tx_cmsg[s], 0, sizeof(e->tx_cmsg[s]));
        m->msg_control = e->tx_cmsg[s];
        m->msg_controllen = sizeof(e->tx_cmsg[s]);
        struct cmsghdr *cm = CMSG_FIRSTHDR(m);
        cm->cmsg_level = t->family == 4 ? IPPROTO_IP : IPPROTO_IPV6;
        cm->cmsg_type = t->family == 4 ? IP_TOS : IPV6_TCLASS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        int v = tos;
        memcpy(CMSG_DATA(cm), &v, sizeof(v));
    }
    e->tx_fd[s] = t->gso_fds[((uint64_t)hash * (uint64_t)t->n_gso) >> 32];
    e->tx_tunnel[s] = idx;
    e->tx_inner_len[s] = inner_len;
    e->tx_last[s] = 1;
}

/* ICMP "fragmentation needed" / ICMPv6 "packet too big" back into the device, from
 * the inner destination to the inner source, as the kernel's tunnel PMTU check does.
 * Returns 1 if sent, 0 if this packet gets none. */
static int send_too_big(struct gdp_engine *e, struct gdp_tunnel *t, const uint8_t *f,
                        const struct inner *in) {
    const uint8_t *ip = f + in->ip_off;
    size_t l2 = t->mode == GDP_MODE_TAP ? 14 : 0;
    uint32_t mtu = t->max_inner - (uint32_t)l2;
    uint8_t *o = e->icmp;
    uint8_t *oip = o + l2;
    size_t total;
    if (in->ipver == 4) {
        size_t ihl = (size_t)(ip[0] & 0x0F) * 4;
        if (!in->df || mtu < 576)
            return 0;
        if (ip[9] == 1 && in->ip_len > ihl) {
            uint8_t type = ip[ihl];
            if (type == 3 || type == 4 || type == 5 || type == 11 || type == 12)
                return 0; /* never an ICMP error about an ICMP error */
        }
        size_t quote = in->ip_len < 548 ? in->ip_len : 548;
        total = 20 + 8 + quote;
        memset(oip, 0, 28);
        oip[0] = 0x45;
        gdp_store16(oip + 2, (uint16_t)total);
        oip[8] = 64;
        oip[9] = 1;
        memcpy(oip + 12, ip + 16, 4);
        memcpy(oip + 16, ip + 12, 4);
        gdp_store16(oip + 10, gdp_inet_csum(oip, 20));
        uint8_t *ic = oip + 20;
        ic[0] = 3;
        ic[1] = 4;
        gdp_store16(ic + 6, (uint16_t)mtu);
        memcpy(ic + 8, ip, quote);
        gdp_store16(ic + 2, gdp_inet_csum(ic, 8 + quote));
    } else {
        if (mtu < 1280)
            return 0;
        if (ip[6] == 58 && in->ip_len > 40 && ip[40] < 128)
            return 0;
        size_t quote = in->ip_len < 1232 ? in->ip_len : 1232;
        total = 40 + 8 + quote;
        memset(oip, 0, 48);
        oip[0] = 0x60;
        gdp_store16(oip + 4, (uint16_t)(8 + quote));
        oip[6] = 58;
        oip[7] = 64;
        memcpy(oip + 8, ip + 24, 16);
        memcpy(oip + 24, ip + 8, 16);
        uint8_t *ic = oip + 40;
        ic[0] = 2;
        gdp_store32(ic + 4, mtu);
        memcpy(ic + 8, ip, quote);
        gdp_store16(ic + 2, l4_csum(6, oip + 8, oip + 24, 58, ic, 8 + quote));
    }
    if (l2) {
        memcpy(o, f + 6, 6); /* to the sender */
        memcpy(o + 6, f, 6); /* from the address it sent to */
        gdp_store16(o + 12, in->ipver == 4 ? ETH_P_IPV4 : ETH_P_IPV6);
    }
    if (dev_write(t, o, l2 + total) < 0)
        t->counters.drops[GDP_DROP_DEV_WRITE]++;
    return 1;
}

/* The GENEVE protocol type of an inner frame: Ethernet in TAP mode, else its IP. */
static uint16_t geneve_proto(const struct gdp_tunnel *t, int ipver) {
    return t->mode == GDP_MODE_TAP ? ETH_P_TEB : ipver == 4 ? ETH_P_IPV4 : ETH_P_IPV6;
}

/* Whether the outer packet carries DF (--df; inherit: IPv6 inner, or inner DF). */
static int outer_df(const struct gdp_tunnel *t, const struct inner *in) {
    return t->df == GDP_DF_SET ||
           (t->df == GDP_DF_INHERIT && (in->ipver == 6 || (in->ipver == 4 && in->df)));
}

/* UDP and outer IP headers in front of ``g`` (the GENEVE header). The datagram is
 * g[0 .. glen) followed by rest[0 .. rest_len) (sent as a second iovec); an even glen
 * lets the checksum run over the two parts in turn. Returns the outer IP header. */
static uint8_t *put_udp_ip(struct gdp_engine *e, struct gdp_tunnel *t, uint32_t hash,
                           uint8_t inner_ecn, int df, uint8_t *g, size_t glen,
                           const uint8_t *rest, size_t rest_len) {
    size_t iplen = t->family == 4 ? 20 : 40;
    size_t udplen = 8 + glen + rest_len;
    size_t total = iplen + udplen;
    uint8_t *u = g - 8;
    uint16_t sport = (uint16_t)(e->cfg.sport_min +
                                (((uint64_t)hash *
                                  (uint64_t)(e->cfg.sport_max - e->cfg.sport_min + 1)) >> 32));
    if (t->n_gso) /* the flow's port must not depend on which path sends a packet */
        sport = t->gso_ports[((uint64_t)hash * (uint64_t)t->n_gso) >> 32];
    gdp_store16(u, sport);
    gdp_store16(u + 2, t->port);
    gdp_store16(u + 4, (uint16_t)udplen);
    gdp_store16(u + 6, 0);
    if (t->udp_csum) {
        size_t alen = t->family == 4 ? 4 : 16;
        uint64_t sum = csum_partial(t->local, alen, 0);
        sum = csum_partial(t->remote, alen, sum);
        sum += 17 + (uint32_t)udplen;
        sum = csum_partial(u, 8 + glen, sum);
        if (rest_len)
            sum = csum_partial(rest, rest_len, sum);
        uint16_t cs = csum_fold(sum);
        gdp_store16(u + 6, cs ? cs : 0xFFFF);
    }
    uint8_t tos = tx_tos(t, inner_ecn);
    uint8_t *ip = u - iplen;
    if (t->family == 4) {
        ip[0] = 0x45;
        ip[1] = tos;
        gdp_store16(ip + 2, (uint16_t)total);
        /* A nonzero ID of our own: with ID 0 the kernel would pick one per datagram and
         * the fragments of one packet would not share it. */
        if (++e->ip_id == 0 || (e->ip_id & 0xFFFF) == 0)
            e->ip_id++;
        gdp_store16(ip + 4, (uint16_t)e->ip_id);
        gdp_store16(ip + 6, df ? IP_DF : 0);
        ip[8] = t->ttl;
        ip[9] = 17;
        gdp_store16(ip + 10, 0);
        memcpy(ip + 12, t->local, 4);
        memcpy(ip + 16, t->remote, 4);
    } else {
        gdp_store32(ip, 0x60000000u | (uint32_t)tos << 20);
        gdp_store16(ip + 4, (uint16_t)udplen);
        ip[6] = 17;
        ip[7] = t->ttl;
        memcpy(ip + 8, t->local, 16);
        memcpy(ip + 24, t->remote, 16);
    }
    return ip;
}

/* Encapsulate the frame at buf + GDP_HEADROOM (flen bytes) for tunnel idx into one or
 * more transmit slots. */
static void tx_one(struct gdp_engine *e, struct tx_state *st, uint32_t idx, uint8_t *buf,
                   size_t flen) {
    struct gdp_tunnel *t = &e->tunnels[idx];
    struct gdp_counters *c = &t->counters;
    uint8_t *f = buf + GDP_HEADROOM;
    struct inner in;
    if (parse_inner(f, flen, t->mode, &in) < 0) {
        c->drops[GDP_DROP_TX_BAD_FRAME]++;
        return;
    }
    /* GENEVE header: the template, or with the reverse flow's options appended. */
    const uint8_t *hdr = t->hdr;
    size_t hlen = t->hdr_len;
    if (t->reflect && in.ipver && flen <= t->max_inner) {
        uint8_t opts[GDP_MAX_OPTIONS_LEN * 2];
        memcpy(opts, t->opts, t->opts_len);
        size_t extra = reflect_lookup(t, f, &in, opts + t->opts_len);
        size_t olen = t->opts_len + extra;
        /* Reflection never makes a packet that fitted need fragments. */
        if (extra && olen <= GDP_MAX_OPTIONS_LEN && flen + olen - t->opts_len <= t->max_inner) {
            int rc = gdp_encode(t->vni, ETH_P_TEB, 0, opts, olen, e->hdr_scratch,
                                sizeof(e->hdr_scratch));
            if (rc > 0) {
                hdr = e->hdr_scratch;
                hlen = (size_t)rc;
            }
        }
    }
    uint8_t *g = f - hlen;
    memcpy(g, hdr, hlen);
    gdp_store16(g + 2, geneve_proto(t, in.ipver));
    if (t->auth && gdp_auth_sign(t->auth, g, hlen + flen, t->hdr_len - GDP_AUTH_OPT_LEN) < 0) {
        c->drops[GDP_DROP_TX_ERROR]++;
        return;
    }

    size_t iplen = t->family == 4 ? 20 : 40;
    size_t udplen = 8 + hlen + flen;
    size_t total = iplen + udplen;
    int df = outer_df(t, &in);
    int frags = total > t->underlay_mtu;
    if (frags) {
        if (flen > t->max_inner && in.ipver && send_too_big(e, t, f, &in)) {
            c->drops[GDP_DROP_TOO_BIG]++;
            return;
        }
        if (df || (t->family == 4 ? total > 65535 : udplen > 65535)) {
            c->drops[GDP_DROP_TOO_BIG]++;
            return;
        }
    }
    uint32_t hash = hash_inner(f, flen, &in, e->cfg.hash_seed);
    if (!frags && t->gso_nocsum && t->n_gso) {
        add_udp_slot(e, st, idx, hash, tx_tos(t, in.ecn), g, hlen + flen, (uint32_t)flen);
        return;
    }
    uint8_t *ip = put_udp_ip(e, t, hash, in.ecn, df, g, hlen + flen, NULL, 0);
    uint8_t *u = g - 8;
    if (!frags) {
        add_slot(e, st, idx, ip, total, NULL, 0, (uint32_t)flen, 1);
        return;
    }
    /* Fragment the outer packet, as the kernel does for a tunnel with DF unset. The
     * raw socket sends exactly what it is given (EMSGSIZE above the device MTU). */
    size_t fh = t->family == 4 ? 20 : 48;
    size_t chunk = (t->underlay_mtu - fh) & ~(size_t)7;
    size_t plen = udplen;
    size_t nfrag = (plen + chunk - 1) / chunk;
    if (nfrag > TX_SLOTS) {
        c->drops[GDP_DROP_TOO_BIG]++;
        return;
    }
    if (st->slots + (int)nfrag > TX_SLOTS)
        tx_send(e, st); /* sends the slots so far; the buffers stay taken until tx_flush */
    if (++e->ip_id == 0)
        e->ip_id++;
    for (size_t off = 0; off < plen; off += chunk) {
        size_t n = plen - off < chunk ? plen - off : chunk;
        int more = off + n < plen;
        uint8_t *fhdr = e->tx_fraghdr[st->slots];
        if (t->family == 4) {
            memcpy(fhdr, ip, 20);
            gdp_store16(fhdr + 2, (uint16_t)(20 + n));
            gdp_store16(fhdr + 6, (uint16_t)((off / 8) | (more ? IP_MF : 0)));
        } else {
            memcpy(fhdr, ip, 40);
            fhdr[6] = 44;
            gdp_store16(fhdr + 4, (uint16_t)(8 + n));
            uint8_t *fr = fhdr + 40;
            fr[0] = 17;
            fr[1] = 0;
            gdp_store16(fr + 2, (uint16_t)(off | (more ? 1 : 0)));
            gdp_store32(fr + 4, e->ip_id);
        }
        add_slot(e, st, idx, fhdr, fh, u + off, n, (uint32_t)flen, !more);
    }
    c->tx_fragmented++;
}

/* Send nseg queued segments (e->gso_iov pairs: GENEVE + inner headers, payload) as
 * one UDP GSO datagram on the tunnel's socket for this flow: the kernel cuts it into
 * seg_size datagrams, and through a veth the super-packet travels whole. */
static void gso_send(struct gdp_engine *e, struct gdp_tunnel *t, uint32_t hash, uint8_t tos,
                     size_t nseg, size_t seg_size) {
    int fd = t->gso_fds[(((uint64_t)hash * (uint64_t)t->n_gso) >> 32)];
    union {
        uint8_t buf[CMSG_SPACE(sizeof(uint16_t)) + CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } ctl;
    memset(&ctl, 0, sizeof(ctl));
    struct msghdr m = {.msg_iov = e->gso_iov, .msg_iovlen = 2 * nseg};
    m.msg_control = ctl.buf;
    m.msg_controllen = sizeof(ctl.buf);
    struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
    cm->cmsg_level = SOL_UDP;
    cm->cmsg_type = UDP_SEGMENT_OPT;
    cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
    uint16_t gs = (uint16_t)seg_size;
    memcpy(CMSG_DATA(cm), &gs, sizeof(gs));
    cm = CMSG_NXTHDR(&m, cm);
    cm->cmsg_level = t->family == 4 ? IPPROTO_IP : IPPROTO_IPV6;
    cm->cmsg_type = t->family == 4 ? IP_TOS : IPV6_TCLASS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    int tosv = tos;
    memcpy(CMSG_DATA(cm), &tosv, sizeof(tosv));
    /* Any IP-level cmsg makes the kernel route the send afresh instead of using the
     * connected socket's cached route: the TOS goes along only when it differs from
     * the one set on the socket (no inner ECN bits). */
    int sock_tos = tos == socket_tos(t);
    if (sock_tos)
        m.msg_controllen = CMSG_SPACE(sizeof(uint16_t));
    struct gdp_counters *c = &t->counters;
    if (t->gso_nocsum) {
        /* One datagram per segment on the flow's connected socket. */
        cm = CMSG_FIRSTHDR(&m);
        cm->cmsg_level = IPPROTO_IP;
        cm->cmsg_type = IP_TOS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &tosv, sizeof(tosv));
        for (size_t i = 0; i < nseg; i++) {
            struct msghdr *mi = &e->tx_msgs[i].msg_hdr;
            memset(mi, 0, sizeof(*mi));
            mi->msg_iov = &e->gso_iov[2 * i];
            mi->msg_iovlen = 2;
            mi->msg_control = sock_tos ? NULL : ctl.buf;
            mi->msg_controllen = sock_tos ? 0 : CMSG_SPACE(sizeof(int));
        }
        size_t done = 0;
        int waits = 0;
        while (done < nseg) {
            int r = sendmmsg(fd, e->tx_msgs + done, (unsigned)(nseg - done), 0);
            if (r > 0) {
                for (size_t i = done; i < done + (size_t)r; i++) {
                    c->tx_packets++;
                    c->tx_bytes += e->gso_inner[i];
                }
                done += (size_t)r;
                continue;
            }
            if (errno == ECONNREFUSED && waits < 10) {
                waits++; /* an ICMP error reported on the connected socket: now cleared */
                continue;
            }
            if ((errno == EAGAIN || errno == ENOBUFS) && waits < 10) {
                struct pollfd p = {fd, POLLOUT, 0};
                poll(&p, 1, 10);
                waits++;
                continue;
            }
            if (errno == EINTR)
                continue;
            c->drops[GDP_DROP_TX_ERROR]++; /* this segment; go on with the next */
            done++;
        }
        return;
    }
    ssize_t r = -1;
    for (int tries = 0; tries < 10; tries++) {
        r = sendmsg(fd, &m, 0);
        if (r < 0 && errno == ECONNREFUSED)
            continue; /* an ICMP error reported on the connected socket: now cleared */
        if (r >= 0 || (errno != EAGAIN && errno != ENOBUFS && errno != EINTR))
            break;
        struct pollfd p = {fd, POLLOUT, 0};
        poll(&p, 1, 10);
    }
    if (r < 0) {
        c->drops[GDP_DROP_TX_ERROR] += nseg;
        return;
    }
    c->tx_packets += nseg;
    for (size_t i = 0; i < nseg; i++)
        c->tx_bytes += e->gso_inner[i];
}

/* The virtio header of the inject device: struct virtio_net_hdr_v1_hash_tunnel. */
#define INJ_VNET_LEN 24
#define VNET_GSO_UDP_TUNNEL_IPV4 0x20
#define INJ_OUTER (14 + 20 + 8) /* Ethernet, IPv4, UDP in front of the GENEVE header */

/* Fill e->inj_hdr: the inject device's virtio header, then Ethernet, outer IPv4 and
 * UDP and the GENEVE header for an inner super-frame of ``ilen`` bytes: GSO type
 * ``gso``, segments of ``seg`` bytes after ``hdrs`` of headers, checksum at ``l4`` +
 * ``coff``. */
static void inj_outer(struct gdp_engine *e, struct gdp_tunnel *t, const uint8_t *hdr,
                      size_t hlen, const struct inner *in, int df, uint32_t hash, size_t ilen,
                      uint8_t gso, size_t hdrs, size_t seg, size_t l4, size_t coff) {
    size_t outer = INJ_OUTER + hlen;
    uint8_t *g = e->inj_hdr + INJ_VNET_LEN + INJ_OUTER;
    memcpy(g, hdr, hlen);
    gdp_store16(g + 2, geneve_proto(t, in->ipver));
    uint8_t *ip = put_udp_ip(e, t, hash, in->ecn, df, g, hlen, NULL, ilen);
    ip[8] = (uint8_t)(t->ttl + 1); /* forwarding takes one off (the caller keeps ttl < 255) */
    gdp_store16(ip + 10, gdp_inet_csum(ip, 20));
    uint8_t *eth = ip - 14;
    memcpy(eth, t->inj_mac, 6);
    memcpy(eth + 6, t->inj_mac, 6);
    eth[6] ^= 0x02; /* any unicast source but the device's own */
    gdp_store16(eth + 12, ETH_P_IPV4);
    uint8_t *v = e->inj_hdr;
    memset(v, 0, INJ_VNET_LEN);
    v[0] = VNET_F_NEEDS_CSUM;
    v[1] = gso;
    size_t put[][2] = {{2, outer + hdrs}, {4, seg}, {6, outer + l4}, {8, coff},
                       {20, 14 + 20}, {22, outer + in->ip_off}};
    for (size_t i = 0; i < sizeof(put) / sizeof(put[0]); i++) {
        v[put[i][0]] = (uint8_t)put[i][1];
        v[put[i][0] + 1] = (uint8_t)(put[i][1] >> 8);
    }
}

/* Whether the underlay device is up and running. One ioctl per super-frame took
 * 15% of the transmit thread's time in system calls (perf trace -s, one TCP
 * stream), so an answer of "up" stands for UNDERLAY_RECHECK_NS: a link that goes
 * down then loses at most that much injected traffic unseen, like the frames
 * already queued on it. */
#define UNDERLAY_RECHECK_NS 1000000

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int underlay_up(struct gdp_engine *e, const struct gdp_tunnel *t) {
    size_t idx = (size_t)(t - e->tunnels);
    if (!t->underlay_ifname[0])
        return 1;
    uint64_t now = now_ns();
    if (now - e->underlay_seen_up[idx] < UNDERLAY_RECHECK_NS)
        return 1;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    memcpy(ifr.ifr_name, t->underlay_ifname, sizeof(ifr.ifr_name) - 1);
    if (ioctl(e->cfg.raw_fd, SIOCGIFFLAGS, &ifr) < 0 ||
        (ifr.ifr_flags & (IFF_UP | IFF_RUNNING)) != (IFF_UP | IFF_RUNNING))
        return 0;
    e->underlay_seen_up[idx] = now;
    return 1;
}

/* Send a TSO super-frame whole: outer headers in front, written to the inject device
 * with a UDP tunnel GSO header. The kernel routes it to the underlay like a packet it
 * forwards, passes it whole through a veth, and otherwise cuts it into segments that
 * each carry all of these headers (GENEVE options included), as for its own tunnels.
 * What the flow sent before it is sent first. Returns 0 when the frame was not taken
 * (the caller segments it here instead). */
static int tx_inject(struct gdp_engine *e, struct tx_state *st, struct gdp_tunnel *t,
                     const uint8_t *vh,
                     const uint8_t *f, size_t flen, const struct inner *in, size_t l4,
                     size_t hdrs, const uint8_t *hdr, size_t hlen, int df, uint32_t hash) {
    size_t outer = INJ_OUTER + hlen;
    /* A frame that fits one underlay packet stays here: the receiver takes a whole
     * datagram for a super-packet only when it is bigger than one underlay packet
     * could be (anything else might be a sender's complete packet). Without this a
     * super-frame of two segments, the second short, arrived with its checksum
     * unfinished and the receiver's TCP dropped it (TcpInCsumErrors). */
    if (t->family != 4 || t->udp_csum || flen <= t->max_inner || outer - 14 + flen > 65535 ||
        load16le(vh + 8) != 16 || !(vh[0] & VNET_F_NEEDS_CSUM) || !underlay_up(e, t))
        return 0;
    tx_send(e, st);
    size_t mss = load16le(vh + 4);
    inj_outer(e, t, hdr, hlen, in, df, hash, flen, (uint8_t)(vh[1] | VNET_GSO_UDP_TUNNEL_IPV4),
              hdrs, mss, l4, 16);
    struct iovec iov[2] = {{e->inj_hdr, INJ_VNET_LEN + outer}, {(void *)f, flen}};
    if (writev(t->inj_fd, iov, 2) != (ssize_t)(INJ_VNET_LEN + outer + flen))
        return 0;
    size_t nseg = (flen - hdrs + mss - 1) / mss;
    e->ip_id += (uint32_t)nseg - 1; /* the kernel numbers the segments on from ours */
    struct gdp_counters *c = &t->counters;
    c->tx_injected++;
    st->done = 1;
    c->tx_packets += nseg;
    c->tx_bytes += flen - hdrs + nseg * hdrs; /* each segment's inner frame */
    return 1;
}

/* Complete a partial checksum (as the device left it) and encapsulate as one packet. */
static void tx_plain(struct gdp_engine *e, struct tx_state *st, uint32_t idx, uint8_t *buf,
                     size_t flen, int partial, size_t cstart, size_t coff) {
    uint8_t *f = buf + GDP_HEADROOM;
    if (partial) {
        if (cstart + coff + 2 > flen) {
            e->tunnels[idx].counters.drops[GDP_DROP_TX_BAD_FRAME]++;
            return;
        }
        /* The field holds the pseudo-header sum; sum the rest over it. */
        uint16_t cs = csum_fold(csum_partial(f + cstart, flen - cstart, 0));
        gdp_store16(f + cstart + coff, cs ? cs : 0xFFFF);
    }
    tx_one(e, st, idx, buf, flen);
}

/* Send a UDP run as one super-frame through the inject device; a run of one, or one
 * the device refuses, leaves datagram by datagram. */
static void uso_flush(struct gdp_engine *e, struct tx_state *st, struct uso_run *r) {
    if (!r->active)
        return;
    r->active = 0;
    struct gdp_tunnel *t = &e->tunnels[r->idx];
    size_t hdrs = r->l4 + 8;
    size_t plen = r->flen - hdrs;
    size_t slen = hdrs + r->nseg * plen;
    size_t outer = INJ_OUTER + t->hdr_len;
    if (r->nseg > 1 && t->inject && outer - 14 + slen <= 65535 && underlay_up(e, t)) {
        tx_send(e, st); /* what the flow sent before the run leaves first */
        const uint8_t *f0 = r->buf + GDP_HEADROOM;
        memcpy(e->uso_hdr, f0, hdrs);
        uint8_t *ip = e->uso_hdr + r->ip_off;
        if (ip[0] >> 4 == 4) {
            gdp_store16(ip + 2, (uint16_t)(slen - r->ip_off));
            gdp_store16(ip + 10, 0);
            gdp_store16(ip + 10, gdp_inet_csum(ip, 20));
        } else {
            gdp_store16(ip + 4, (uint16_t)(slen - r->l4));
        }
        /* The UDP length stays one datagram's: the segment size, for the receiver. */
        struct inner in = {.ipver = ip[0] >> 4, .ip_off = r->ip_off, .ecn = r->ecn};
        inj_outer(e, t, t->hdr, t->hdr_len, &in, r->df, r->hash, slen,
                  VNET_GSO_UDP_L4 | VNET_GSO_UDP_TUNNEL_IPV4, hdrs, plen, r->l4, 6);
        struct iovec *v = e->uso_iov;
        v[0].iov_base = e->inj_hdr;
        v[0].iov_len = INJ_VNET_LEN + outer;
        v[1].iov_base = e->uso_hdr;
        v[1].iov_len = hdrs;
        for (uint32_t k = 0; k < r->nseg; k++) {
            v[2 + k].iov_base = r->bufs[k] + GDP_HEADROOM + hdrs;
            v[2 + k].iov_len = plen;
        }
        if (writev(t->inj_fd, v, (int)r->nseg + 2) == (ssize_t)(INJ_VNET_LEN + outer + slen)) {
            e->ip_id += r->nseg - 1;
            struct gdp_counters *c = &t->counters;
            c->tx_injected++;
            c->tx_packets += r->nseg;
            c->tx_bytes += r->nseg * r->flen;
            return;
        }
    }
    for (uint32_t k = 0; k < r->nseg; k++)
        tx_plain(e, st, r->idx, r->bufs[k], r->flen, 1, r->l4, 6);
}

static void uso_flush_all(struct gdp_engine *e, struct tx_state *st) {
    for (int k = 0; k < USO_RUNS; k++)
        uso_flush(e, st, &e->uso[k]);
}

static int same_bytes(const uint8_t *a, const uint8_t *b, size_t from, size_t to) {
    return !memcmp(a + from, b + from, to - from);
}

/* Take a datagram read from the device into a UDP run; 0 when it cannot be (the caller
 * sends it as it is, after flushing the runs). */
static int uso_add(struct gdp_engine *e, struct tx_state *st, uint32_t idx, uint8_t *buf,
                   size_t flen, const uint8_t *vh, const struct inner *in) {
    struct gdp_tunnel *t = &e->tunnels[idx];
    const uint8_t *f = buf + GDP_HEADROOM;
    size_t ipo = in->ip_off;
    size_t l4 = ipo + (in->ipver == 4 ? 20 : 40);
    if (!t->inject || t->reflect || !in->ipver || in->proto != 17 || !in->ports ||
        !(vh[0] & VNET_F_NEEDS_CSUM) || load16le(vh + 6) != l4 || load16le(vh + 8) != 6 ||
        flen <= l4 + 8 || flen > t->max_inner || gdp_load16(f + l4 + 4) != flen - l4)
        return 0;
    const uint8_t *ip = f + ipo;
    if (in->ipver == 4 ? ip[0] != 0x45 || gdp_load16(ip + 2) != flen - ipo
                       : gdp_load16(ip + 4) != flen - l4)
        return 0;
    size_t addr_from = ipo + (in->ipver == 4 ? 12 : 8);
    for (int k = 0; k < USO_RUNS; k++) {
        struct uso_run *r = &e->uso[k];
        if (!r->active || r->idx != idx || r->ip_off != ipo)
            continue;
        const uint8_t *f0 = r->buf + GDP_HEADROOM;
        if (r->l4 != l4 || !same_bytes(f0, f, addr_from, l4 + 4))
            continue; /* another flow */
        int alike = r->flen == flen && same_bytes(f0, f, 0, ipo) &&
                    (in->ipver == 6 ? same_bytes(f0, f, ipo, l4 + 8)
                                    : same_bytes(f0, f, ipo, ipo + 4) &&
                                          same_bytes(f0, f, ipo + 6, ipo + 10) &&
                                          same_bytes(f0, f, ipo + 12, l4 + 8) &&
                                          gdp_load16(ip + 4) == r->next_id);
        size_t room = INJ_OUTER - 14 + t->hdr_len + l4 + 8 + (r->nseg + 1) * (flen - l4 - 8);
        if (alike && r->nseg < USO_RUN_MAX && room <= 65535) {
            r->bufs[r->nseg++] = buf;
            r->next_id++;
            return 1;
        }
        uso_flush(e, st, r); /* the flow changed: its run leaves before this datagram */
        break;
    }
    struct uso_run *r = NULL;
    for (int k = 0; k < USO_RUNS && !r; k++)
        if (!e->uso[k].active)
            r = &e->uso[k];
    if (!r) {
        r = &e->uso[e->uso_rr++ % USO_RUNS];
        uso_flush(e, st, r);
    }
    r->active = 1;
    r->idx = idx;
    r->buf = buf;
    r->flen = flen;
    r->ip_off = ipo;
    r->l4 = l4;
    r->next_id = (uint16_t)(in->ipver == 4 ? gdp_load16(ip + 4) + 1 : 0);
    r->hash = hash_inner(f, flen, in, e->cfg.hash_seed);
    r->df = outer_df(t, in);
    r->ecn = in->ecn;
    r->nseg = 1;
    r->bufs[0] = buf;
    return 1;
}

/* A frame from a device with a virtio header: complete a partial checksum, or cut a
 * TCP super-frame into MSS-sized segments (what the kernel's GSO would do), each
 * encapsulated on its own. The header sits right in front of the frame. */
static void tx_vnet(struct gdp_engine *e, struct tx_state *st, uint32_t idx, uint8_t *buf,
                    size_t flen) {
    struct gdp_tunnel *t = &e->tunnels[idx];
    struct gdp_counters *c = &t->counters;
    uint8_t *f = buf + GDP_HEADROOM;
    const uint8_t *vh = f - GDP_VNET_LEN;
    uint8_t flags = vh[0];
    uint8_t gso = vh[1] & (uint8_t)~VNET_GSO_ECN;
    size_t gso_size = load16le(vh + 4);
    size_t cstart = load16le(vh + 6);
    size_t coff = load16le(vh + 8);
    struct inner in;
    if (gso == VNET_GSO_NONE) {
        if (t->inject && parse_inner(f, flen, t->mode, &in) == 0 &&
            uso_add(e, st, idx, buf, flen, vh, &in))
            return;
        uso_flush_all(e, st); /* a flow's run goes before anything else it sends */
        tx_plain(e, st, idx, buf, flen, flags & VNET_F_NEEDS_CSUM, cstart, coff);
        return;
    }
    if ((gso != VNET_GSO_TCPV4 && gso != VNET_GSO_TCPV6) || gso_size == 0 ||
        parse_inner(f, flen, t->mode, &in) < 0 || in.ipver != (gso == VNET_GSO_TCPV4 ? 4 : 6) ||
        in.proto != 6 || cstart + 20 > flen) {
        c->drops[GDP_DROP_TX_BAD_FRAME]++;
        return;
    }
    size_t l4 = cstart; /* the TCP header: where its checksum starts */
    size_t hdrs = l4 + (size_t)(f[l4 + 12] >> 4) * 4;
    if (hdrs > flen || hdrs > SEG_INNER_MAX || hdrs < l4 + 20) {
        c->drops[GDP_DROP_TX_BAD_FRAME]++;
        return;
    }
    c->tx_gso_frames++;
    const uint8_t *hdr = t->hdr;
    size_t hlen = t->hdr_len;
    if (t->reflect) {
        uint8_t opts[GDP_MAX_OPTIONS_LEN * 2];
        memcpy(opts, t->opts, t->opts_len);
        size_t extra = reflect_lookup(t, f, &in, opts + t->opts_len);
        size_t olen = t->opts_len + extra;
        if (extra && olen <= GDP_MAX_OPTIONS_LEN && hdrs + gso_size + extra <= t->max_inner) {
            int rc = gdp_encode(t->vni, ETH_P_TEB, 0, opts, olen, e->hdr_scratch,
                                sizeof(e->hdr_scratch));
            if (rc > 0) {
                hdr = e->hdr_scratch;
                hlen = (size_t)rc;
            }
        }
    }
    if (hdrs + gso_size + (hlen - t->hdr_len) > t->max_inner) {
        /* Segments the underlay cannot carry (only an explicit tunnel MTU above the
         * path allows this): the ICMP error tells the sender's TCP the path MTU, as
         * the kernel's tunnel PMTU check does for GSO packets. */
        send_too_big(e, t, f, &in);
        c->drops[GDP_DROP_TOO_BIG]++;
        return;
    }
    int df = outer_df(t, &in);
    uint32_t hash = hash_inner(f, flen, &in, e->cfg.hash_seed);
    if (t->inject && tx_inject(e, st, t, vh, f, flen, &in, l4, hdrs, hdr, hlen, df, hash))
        return;
    uint16_t proto = geneve_proto(t, in.ipver);
    size_t ipo = in.ip_off;
    uint16_t ip_id = in.ipver == 4 ? gdp_load16(f + ipo + 4) : 0;
    uint32_t seq = gdp_load32(f + l4 + 4);
    uint8_t tcp_flags = f[l4 + 13];
    size_t outer_room = (t->family == 4 ? 20 : 40) + 8 + hlen;
    int udp_gso = t->n_gso > 0;
    size_t nseg = 0; /* segments waiting in e->gso_iov (UDP GSO path) */
    uint8_t tos = tx_tos(t, in.ecn);
    if (udp_gso)
        tx_send(e, st); /* the scratch headers below are reused from slot 0 */
    size_t per_send = t->gso_nocsum ? GSO_MAX_SEGS : 60000 / (hlen + hdrs + gso_size);
    if (per_send > GSO_MAX_SEGS)
        per_send = GSO_MAX_SEGS;
    for (size_t off = hdrs, i = 0; off < flen; off += gso_size, i++) {
        size_t n = flen - off < gso_size ? flen - off : gso_size;
        int last = off + n >= flen;
        if (!udp_gso && st->slots >= TX_SLOTS)
            tx_send(e, st);
        uint8_t *sh = e->tx_seghdr[udp_gso ? nseg : (size_t)st->slots];
        uint8_t *ih = sh + outer_room; /* this segment's inner headers */
        memcpy(ih, f, hdrs);
        uint8_t *sip = ih + ipo;
        if (in.ipver == 4) {
            gdp_store16(sip + 2, (uint16_t)(hdrs - ipo + n));
            gdp_store16(sip + 4, (uint16_t)(ip_id + i));
            gdp_store16(sip + 10, 0);
            gdp_store16(sip + 10, gdp_inet_csum(sip, (size_t)(sip[0] & 0x0F) * 4));
        } else {
            gdp_store16(sip + 4, (uint16_t)(hdrs - ipo - 40 + n));
        }
        uint8_t *tcp = ih + l4;
        gdp_store32(tcp + 4, seq + (uint32_t)(off - hdrs));
        uint8_t fl = tcp_flags;
        if (!last)
            fl &= (uint8_t)~0x09; /* FIN and PSH only on the last segment */
        if (i)
            fl &= (uint8_t)~0x80; /* CWR only on the first */
        tcp[13] = fl;
        gdp_store16(tcp + 16, 0);
        uint64_t sum = pseudo_sum(sip, in.ipver, 6, hdrs - l4 + n);
        sum = csum_partial(tcp, hdrs - l4, sum);
        sum = csum_partial(f + off, n, sum);
        gdp_store16(tcp + 16, csum_fold(sum));
        uint8_t *g = ih - hlen;
        memcpy(g, hdr, hlen);
        gdp_store16(g + 2, proto);
        if (t->auth && gdp_auth_sign2(t->auth, g, hlen + hdrs, f + off, n,
                                      t->hdr_len - GDP_AUTH_OPT_LEN, e->auth_seg,
                                      sizeof(e->auth_seg)) < 0) {
            c->drops[GDP_DROP_TX_ERROR]++;
            continue;
        }
        if (udp_gso) {
            e->gso_iov[2 * nseg].iov_base = g;
            e->gso_iov[2 * nseg].iov_len = hlen + hdrs;
            e->gso_iov[2 * nseg + 1].iov_base = f + off;
            e->gso_iov[2 * nseg + 1].iov_len = n;
            e->gso_inner[nseg] = (uint32_t)(hdrs + n);
            nseg++;
            if (nseg == per_send || last) {
                gso_send(e, t, hash, tos, nseg, hlen + hdrs + gso_size);
                nseg = 0;
            }
            continue;
        }
        uint8_t *ip = put_udp_ip(e, t, hash, in.ecn, df, g, hlen + hdrs, f + off, n);
        add_slot(e, st, idx, ip, outer_room + hdrs, f + off, n, (uint32_t)(hdrs + n), 1);
    }
}

/* Read what the ready devices have (by the revents of e->pfds) and encapsulate it. */
static void tx_read(struct gdp_engine *e, struct tx_state *st) {
    for (uint32_t k = 0; k < e->n; k++) {
        uint32_t idx = (e->rr + k) % e->n;
        struct pollfd *p = &e->pfds[1 + idx];
        if (!(p->revents & (POLLIN | POLLERR | POLLHUP)))
            continue;
        struct gdp_tunnel *t = &e->tunnels[idx];
        /* A bounded number of frames per device per round keeps tunnels fair. */
        for (int got = 0; got < GDP_BATCH * 2; got++) {
            if (st->bufs == GDP_BATCH) {
                uso_flush_all(e, st); /* runs point into the buffers tx_flush frees */
                tx_flush(e, st);
            }
            uint8_t *buf = e->tx_bufs + (size_t)st->bufs * GDP_BUF_SIZE;
            size_t vlen = t->vnet_hdr ? GDP_VNET_LEN : 0;
            ssize_t r = read(t->dev_fd, buf + GDP_HEADROOM - vlen, GDP_BUF_SIZE - GDP_HEADROOM + vlen);
            if (r < 0) {
                /* EBADFD: the device was deleted and this fd is dead for good. Poll
                 * would report it ready for ever (a busy loop), so stop polling it;
                 * the supervisor opens a new device. EAGAIN: drained. */
                if (errno == EBADFD)
                    p->fd = -1;
                break;
            }
            if ((size_t)r <= vlen)
                break;
            st->bufs++;
            st->done = 0;
            if (vlen)
                tx_vnet(e, st, idx, buf, (size_t)r - vlen);
            else
                tx_one(e, st, idx, buf, (size_t)r);
            if (st->done)
                st->bufs--; /* the next read lands in the same, cache-warm buffer */
        }
    }
}

/* How long a growing UDP run waits for the rest of its burst once the devices are
 * drained: a sender's burst reaches the device a datagram at a time, and a run cut
 * at every drain is a run of one or two. Only a run that already has two datagrams
 * waits, so a lone datagram (a request) leaves at once. */
#define USO_HOLD_NS 50000

static int uso_growing(const struct gdp_engine *e) {
    for (int k = 0; k < USO_RUNS; k++)
        if (e->uso[k].active && e->uso[k].nseg >= 2)
            return 1;
    return 0;
}

/* One round: read, encapsulate, send in batches. */
static void tx_round(struct gdp_engine *e, struct tx_state *st) {
    tx_read(e, st);
    if (uso_growing(e) && st->bufs < GDP_BATCH) {
        struct timespec hold = {0, USO_HOLD_NS};
        if (ppoll(e->pfds + 1, e->n, &hold, NULL) > 0)
            tx_read(e, st);
    }
    e->rr++;
    uso_flush_all(e, st);
    tx_flush(e, st);
}

int gdp_engine_run(struct gdp_engine *e, int dirs) {
    struct tx_state st = {0, 0, 0};
    int do_rx = (dirs & GDP_DIR_RX) != 0;
    int do_tx = (dirs & GDP_DIR_TX) != 0;
    /* Each direction has its own pollfd set: pfds for transmit, a local one for
     * receive, so two threads can run one engine. */
    struct pollfd rxp[2] = {{e->cfg.stop_fd, POLLIN, 0}, {e->cfg.udp_fd, POLLIN, 0}};
    if (do_tx) {
        e->pfds[0].fd = e->cfg.stop_fd;
        e->pfds[0].events = POLLIN;
        for (uint32_t i = 0; i < e->n; i++) {
            e->pfds[1 + i].fd = e->tunnels[i].dev_fd;
            e->pfds[1 + i].events = POLLIN;
        }
    }
    for (;;) {
        if (do_rx && !do_tx) {
            if (poll(rxp, 2, -1) < 0) {
                if (errno == EINTR)
                    continue;
                return -errno;
            }
            if (rxp[0].revents)
                return 0;
            if (rxp[1].revents) {
                int rc = rx_batch(e);
                if (rc < 0)
                    return rc;
            }
        } else if (do_tx && !do_rx) {
            if (poll(e->pfds, e->n + 1, -1) < 0) {
                if (errno == EINTR)
                    continue;
                return -errno;
            }
            if (e->pfds[0].revents)
                return 0;
            tx_round(e, &st);
        } else {
            /* Both directions in one thread: poll the socket with the devices. */
            struct pollfd *p = e->pfds;
            p[0].fd = e->cfg.stop_fd;
            p[0].events = POLLIN;
            p[e->n + 1].fd = e->cfg.udp_fd;
            p[e->n + 1].events = POLLIN;
            if (poll(p, e->n + 2, -1) < 0) {
                if (errno == EINTR)
                    continue;
                return -errno;
            }
            if (p[0].revents)
                return 0;
            if (p[e->n + 1].revents) {
                int rc = rx_batch(e);
                if (rc < 0)
                    return rc;
            }
            tx_round(e, &st);
        }
    }
}
