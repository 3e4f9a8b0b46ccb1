/* The engine's own state and the functions its parts share (not part of the API).
 *
 * engine.c  setup and the per-direction loops
 * rx.c      receive: socket-level, tunnel-level and delivery checks, device writes
 * encap.c   transmit: outer headers from the tunnel's template, fragments, TSO cuts
 * inject.c  transmit through the inject device: super-frames and UDP runs whole
 * txq.c     the transmit queue: slots, sendmmsg/sendmsg, one errno policy
 * gro.c, seg.c, inner.c, csum.h: pure packet transforms (no fds) */
#ifndef GDP_ENGINE_INT_H
#define GDP_ENGINE_INT_H

#define _GNU_SOURCE
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>

#include "auth.h"
#include "engine.h"
#include "gro.h"
#include "inner.h"
#include "proto.h"
#include "seg.h"

#define TX_SLOTS (GDP_BATCH * 4)
#define CMSG_BUF 96
#define SEG_HDR_MAX (IP6_HLEN + UDP_HLEN + GDP_MAX_HEADER_LEN + SEG_INNER_MAX)
#define GSO_MAX_SEGS 40 /* per UDP GSO send: below UDP_MAX_SEGMENTS and 64 KiB */
#define GSO_MAX_BYTES 60000 /* per UDP GSO send, headers apart: below 64 KiB */
#define INJ_OUTER (ETH_HLEN + IP4_HLEN + UDP_HLEN) /* in front of the GENEVE header */

/* Transmit coalescing of UDP (with the inject device): datagrams of one flow read from
 * the device in a row, alike but for their IPv4 IDs (which follow on) and with partial
 * checksums, leave as one UDP_L4 super-frame inside one GENEVE packet. The kernel cuts
 * it back into the same datagrams wherever it is segmented, each with all the outer
 * headers; through a veth the peer receives it whole (seg.h super_plan). */
#define USO_RUNS 4
#define USO_RUN_MAX 64

struct uso_run {
    int active;
    uint32_t idx; /* tunnel */
    uint8_t *buf; /* the first datagram's buffer (frame at GDP_HEADROOM) */
    size_t flen;  /* every datagram's frame length */
    size_t ip_off, l4;
    uint16_t next_id;
    uint32_t hash;
    int df;
    uint8_t ecn;
    uint32_t nseg;
    uint8_t *bufs[USO_RUN_MAX];
};

struct tx_state {
    int slots; /* used transmit slots */
    int bufs;  /* used transmit buffers */
    int done;  /* the frame just read was sent whole: its buffer is free again */
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
    /* How many leading rx_msgs entries the last recvmmsg may have changed (the
     * rest still hold what rx_batch set): a lone datagram rewrites one or two, not
     * the whole batch's cache lines. */
    int rx_reset;
    struct gdp_header rx_hdr;
    struct gro_state gro;

    /* transmit scratch: a slot is one outer datagram (a packet or one fragment) */
    struct mmsghdr tx_msgs[TX_SLOTS];
    struct iovec tx_iov[TX_SLOTS][2];
    struct sockaddr_in6 tx_addr[TX_SLOTS];
    uint8_t tx_fraghdr[TX_SLOTS][IP6_HLEN + IP6_FRAG_HLEN];
    /* per-slot headers of a TSO segment: outer IP, UDP, GENEVE, inner headers */
    uint8_t tx_seghdr[TX_SLOTS][SEG_HDR_MAX] __attribute__((aligned(8)));
    struct iovec gso_iov[2 * GSO_MAX_SEGS];
    uint32_t gso_inner[GSO_MAX_SEGS];
    /* Signed packets in gso_iov waiting for one UDP GSO send (gso_batch_add). */
    struct {
        uint32_t n, idx, hash, size, bytes;
        uint8_t tos, closed;
    } gb;
    uint32_t tx_tunnel[TX_SLOTS];
    int tx_fd[TX_SLOTS]; /* the raw socket, or a tunnel's connected UDP socket */
    uint8_t tx_cmsg[TX_SLOTS][CMSG_SPACE(sizeof(int))] __attribute__((aligned(8)));
    uint32_t tx_inner_len[TX_SLOTS]; /* set on a packet's last slot only */
    uint8_t tx_last[TX_SLOTS];
    uint8_t icmp[ICMP_BUF];
    uint8_t hdr_scratch[GDP_MAX_HEADER_LEN];
    /* Authenticated tunnels (auth.h): the receive thread's derived keys and where the
     * packet in hand has its verified option; where the transmit thread lays out a
     * TSO segment whole to MAC it. */
    uint8_t auth_cache[GDP_AUTH_CACHE_BYTES] __attribute__((aligned(16)));
    size_t rx_auth_off;
    uint8_t auth_seg[SEG_HDR_MAX + GDP_FRAME_MAX] __attribute__((aligned(16)));
    uint8_t inj_hdr[VNET_TUNNEL_LEN + INJ_OUTER + GDP_MAX_HEADER_LEN] __attribute__((aligned(8)));
    struct uso_run uso[USO_RUNS];
    uint32_t uso_rr; /* the run to give up next when all are taken */
    uint8_t uso_hdr[SEG_INNER_MAX];
    struct iovec uso_iov[USO_RUN_MAX + 2];
    struct pollfd pfds[GDP_MAX_TUNNELS + 2]; /* stop_fd, the devices, kick_tx_fd */
    /* When each direction last kicked the other into busy polling (CLOCK_MONOTONIC
     * ns; each written by its own thread only). */
    uint64_t rx_kicked_at;
    uint64_t tx_kicked_at;
    /* When each tunnel's underlay device was last found up (CLOCK_MONOTONIC ns). */
    uint64_t underlay_seen_up[GDP_MAX_TUNNELS];
};

/* CLOCK_MONOTONIC in nanoseconds. */
static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- rx.c */
int rx_batch(struct gdp_engine *e);
/* Write a frame to the tunnel's device, behind an all-zero virtio header when the
 * device has one (no offload claimed: the kernel checks the inner checksums). Returns
 * the frame bytes written, or -1. */
ssize_t dev_write(struct gdp_tunnel *t, const uint8_t *f, size_t len);

/* ---- txq.c */
/* Send every queued slot; a datagram that cannot be sent drops its whole packet,
 * counted once as tx_error. */
void tx_send(struct gdp_engine *e, struct tx_state *st);
/* tx_send, and the transmit buffers are free again. */
void tx_flush(struct gdp_engine *e, struct tx_state *st);
/* Queue one outer datagram for the raw socket: h[0..hlen) then d[0..dlen); ``last``
 * marks a packet's last fragment, which counts the packet (inner_len bytes). */
void add_slot(struct gdp_engine *e, struct tx_state *st, uint32_t idx, uint8_t *h, size_t hlen,
              uint8_t *d, size_t dlen, uint32_t inner_len, int last);
/* Queue a whole GENEVE datagram (g then rest) for the tunnel's connected UDP socket of
 * this flow: the kernel writes UDP and IP. Only where the UDP checksum is off. */
void add_udp_slot(struct gdp_engine *e, struct tx_state *st, uint32_t idx, uint32_t hash,
                  uint8_t tos, uint8_t *g, size_t glen, uint8_t *rest, size_t rest_len,
                  uint32_t inner_len);
/* Send nseg queued segments (e->gso_iov pairs) as one UDP GSO datagram of seg_size
 * segments on the tunnel's socket for this flow. */
void gso_send(struct gdp_engine *e, struct gdp_tunnel *t, uint32_t hash, uint8_t tos,
              size_t nseg, size_t seg_size);
/* Queue a whole signed GENEVE datagram (g, glen) of an authenticated tunnel for one
 * UDP GSO send with the packets around it: one tunnel, socket and TOS, every datagram
 * as long as the first but the last, so the kernel's cut at the first's size gives back
 * exactly these datagrams, each with its own MAC. The batch and the slots are never
 * both in use: each sends the other first, so packets leave in the order queued. */
void gso_batch_add(struct gdp_engine *e, struct tx_state *st, uint32_t idx, uint32_t hash,
                   uint8_t tos, uint8_t *g, size_t glen, uint32_t inner_len);
/* The tunnel's connected UDP socket for a flow. */
static inline int flow_fd(const struct gdp_tunnel *t, uint32_t hash) {
    return t->gso_fds[((uint64_t)hash * (uint64_t)t->n_gso) >> 32];
}

/* ---- encap.c */
/* Encapsulate the frame at buf + GDP_HEADROOM (flen bytes) into transmit slots. */
void tx_one(struct gdp_engine *e, struct tx_state *st, uint32_t idx, uint8_t *buf, size_t flen);
/* tx_one after completing a partial checksum (cstart, coff: as the device left it). */
void tx_plain(struct gdp_engine *e, struct tx_state *st, uint32_t idx, uint8_t *buf,
              size_t flen, int partial, size_t cstart, size_t coff);
/* A frame from a device with a virtio header in front of it. */
void tx_vnet(struct gdp_engine *e, struct tx_state *st, uint32_t idx, uint8_t *buf, size_t flen);
/* UDP and outer IP headers in front of g (the GENEVE header), from the tunnel's
 * template; the datagram is g[0 .. glen) then rest[0 .. rest_len). Returns the outer
 * IP header. */
uint8_t *put_udp_ip(struct gdp_engine *e, struct gdp_tunnel *t, uint32_t hash,
                    const struct inner *in, int df, uint8_t *g, size_t glen, const uint8_t *rest,
                    size_t rest_len);

/* The outer TOS without ECN bits: what the tunnel's UDP sockets are set to. */
static inline uint8_t socket_tos(const struct gdp_tunnel *t) {
    return (uint8_t)(t->tos_set == GDP_TOS_FIXED ? t->tos & ~ECN_MASK : 0);
}
/* The outer TOS of a packet: the configured DSCP, or with tos inherit the inner one (0
 * for a frame that is not IP, as the kernel's ip_tunnel_get_dsfield); RFC 6040 normal
 * mode copies the inner ECN, except that CE goes out as ECT(0). */
static inline uint8_t tx_tos(const struct gdp_tunnel *t, const struct inner *in) {
    uint8_t dscp = t->tos_set == GDP_TOS_INHERIT ? (uint8_t)(in->dsfield & ~ECN_MASK)
                                                 : socket_tos(t);
    return (uint8_t)(dscp | (in->ecn == ECN_CE ? ECN_ECT0 : in->ecn));
}
/* The outer TTL of a packet: the configured one, or with ttl inherit (t->ttl 0) the
 * inner TTL / hop limit, and the default for a frame that is not IP. */
static inline uint8_t tx_ttl(const struct gdp_tunnel *t, const struct inner *in) {
    if (t->ttl)
        return t->ttl;
    return in->ipver ? in->ttl : GDP_DEFAULT_TTL;
}
/* The GENEVE protocol type of an inner frame: Ethernet in TAP mode, else its IP. */
static inline uint16_t geneve_proto(const struct gdp_tunnel *t, int ipver) {
    return t->mode == GDP_MODE_TAP ? ETH_P_TEB : ipver == 4 ? ETH_P_IPV4 : ETH_P_IPV6;
}
/* Whether the outer packet carries DF (--df; inherit: IPv6 inner, or inner DF). */
static inline int outer_df(const struct gdp_tunnel *t, const struct inner *in) {
    return t->df == GDP_DF_SET ||
           (t->df == GDP_DF_INHERIT && (in->ipver == 6 || (in->ipver == 4 && in->df)));
}

/* ---- inject.c */
/* Send a TSO super-frame whole through the inject device; 0 when not taken (the caller
 * segments it). */
int tx_inject(struct gdp_engine *e, struct tx_state *st, struct gdp_tunnel *t,
              const struct vnet_hdr *v, const uint8_t *f, size_t flen, const struct inner *in,
              const struct seg_plan *p, const uint8_t *hdr, size_t hlen, int df, uint32_t hash);
/* Take a datagram into a UDP run; 0 when it cannot be (the caller sends it as it is,
 * after uso_flush_all). */
int uso_add(struct gdp_engine *e, struct tx_state *st, uint32_t idx, uint8_t *buf, size_t flen,
            const struct vnet_hdr *v, const struct inner *in);
void uso_flush_all(struct gdp_engine *e, struct tx_state *st);
/* Whether a run has two datagrams or more and may grow on. */
int uso_growing(const struct gdp_engine *e);

#endif
