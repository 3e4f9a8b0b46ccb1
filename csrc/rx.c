/* Receive: recvmmsg a batch of datagrams from the UDP socket (outer TOS from the
 * IP_TOS / IPV6_TCLASS cmsg, outer source from msg_name) and check each the way the
 * kernel's geneve.c does, in three steps: socket-level (a GENEVE header, a tunnel for
 * its VNI and outer source), tunnel-level (options, C bit, OAM, protocol type) and
 * delivery (inner headers, loop guard, ECN), then write the inner frame to the
 * tunnel's device, coalesced where the device takes super-frames. */
#include "engine_int.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "csum.h"
#include "testpoints.h"

#define UDP_GRO_OPT 104           /* linux/udp.h UDP_GRO */
#define IP_RECVFRAGSIZE_OPT 25    /* linux/in.h */
#define IPV6_RECVFRAGSIZE_OPT 77  /* linux/in6.h */
#ifndef SOL_UDP
#define SOL_UDP 17
#endif

static const uint8_t vnet_zero[GDP_VNET_LEN];

ssize_t dev_write(struct gdp_tunnel *t, const uint8_t *f, size_t len) {
    if (!t->vnet_hdr)
        return write(t->dev_fd, f, len);
    struct iovec iov[2] = {{(void *)vnet_zero, GDP_VNET_LEN}, {(void *)f, len}};
    ssize_t r = writev(t->dev_fd, iov, 2);
    return r < 0 ? r : r - GDP_VNET_LEN;
}

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
        uint16_t old = gdp_load16(ip);
        ip[IP4_TOS_OFF] |= ECN_CE;
        ip4_set_csum(ip, csum_update16(ip4_csum(ip), old, gdp_load16(ip)));
    } else {
        ip[1] |= ECN_CE << 4;
    }
    return 0;
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
static void gro_flush(struct gdp_engine *e) {
    struct gro_out out;
    if (!gro_finish(&e->gro, &out))
        return;
    struct gdp_tunnel *t = &e->tunnels[out.idx];
    if (writev(t->dev_fd, out.iov, out.n) != (ssize_t)out.len)
        t->counters.drops[GDP_DROP_DEV_WRITE]++;
    else if (out.nseg > 1)
        t->counters.rx_gro_frames++;
}

/* A GSO super-packet (seg.h super_plan), written to a device with a virtio header as
 * one GSO frame, or TCP without one as one large packet with its checksum completed
 * here (the kernel's TCP takes that as well). Returns 0, touching nothing, when the
 * frame is not one. */
static int rx_super(struct gdp_engine *e, struct gdp_tunnel *t, uint8_t *f, size_t flen,
                    const struct inner *in, size_t gso_size) {
    struct super_plan p;
    if (!super_plan(f, flen, in, t->rx_uso, t->max_inner, t->dev_mtu, gso_size, &p))
        return 0;
    gro_flush(e); /* what came before it goes first */
    struct gdp_counters *c = &t->counters;
    ssize_t want = (ssize_t)flen;
    ssize_t r;
    if (t->vnet_hdr) {
        uint8_t vh[GDP_VNET_LEN];
        super_vnet(f, flen, in, &p, vh);
        struct iovec iov[2] = {{vh, GDP_VNET_LEN}, {f, flen}};
        want += GDP_VNET_LEN;
        r = writev(t->dev_fd, iov, 2);
    } else {
        csum_complete(f + p.l4, flen - p.l4, TCP_CSUM_OFF);
        r = write(t->dev_fd, f, flen);
    }
    if (r != want) {
        c->rx_packets--; /* counted by the caller */
        c->rx_bytes -= flen;
        c->drops[GDP_DROP_DEV_WRITE]++;
        return 1;
    }
    c->rx_packets += p.nseg - 1;
    c->rx_bytes += (p.nseg - 1) * p.hdrs; /* each segment's inner frame, as the sender counts */
    c->rx_gro_frames++;
    return 1;
}

/* Socket-level checks: a GENEVE header, and a tunnel with its VNI whose remote is the
 * outer source. Returns the tunnel's index, or e->n (counted on the socket). */
static uint32_t rx_socket_checks(struct gdp_engine *e, const uint8_t *pkt, size_t len,
                                 const struct sockaddr_in6 *from, int *hdr_len) {
    struct gdp_sock_stats *ss = e->stats;
    struct gdp_header *h = &e->rx_hdr;
    int rc = gdp_decode(pkt, len, h);
    if (rc < 0) {
        static const int reason[] = {GDP_DROP_TRUNCATED, GDP_DROP_TRUNCATED, GDP_DROP_BAD_VERSION,
                                     GDP_DROP_OPTIONS_TRUNCATED, GDP_DROP_OPTION_OVERRUNS};
        ss->drops[-rc >= 1 && -rc <= 4 ? reason[-rc] : GDP_DROP_TRUNCATED]++;
        return e->n;
    }
    *hdr_len = rc;
    const uint8_t *src;
    size_t alen;
    if (e->cfg.family == 4) {
        src = (const uint8_t *)&((const struct sockaddr_in *)from)->sin_addr;
        alen = 4;
    } else {
        src = (const uint8_t *)&from->sin6_addr;
        alen = 16;
    }
    int vni_seen = 0;
    for (uint32_t i = 0; i < e->n; i++) {
        if (e->tunnels[i].vni != h->vni)
            continue;
        vni_seen = 1;
        if (!memcmp(e->tunnels[i].remote, src, alen))
            return i;
    }
    ss->drops[vni_seen ? GDP_DROP_WRONG_REMOTE : GDP_DROP_UNKNOWN_VNI]++;
    return e->n;
}

/* Tunnel-level checks: options counted, the integrity option of an authenticated
 * tunnel (first: nothing acts on a packet not known to come from the peer), C bit and
 * critical options, OAM packets to the control queue, the protocol type of the
 * tunnel's mode. Returns 1 to go on. */
static int rx_tunnel_checks(struct gdp_engine *e, uint32_t idx, uint8_t *pkt, size_t len) {
    const struct gdp_header *h = &e->rx_hdr;
    struct gdp_tunnel *t = &e->tunnels[idx];
    struct gdp_counters *c = &t->counters;
    if (h->n_options)
        count_options(t, h);
    if (t->auth) {
        struct gdp_auth_cache *cache = (struct gdp_auth_cache *)e->auth_cache;
        int arc = gdp_auth_verify(t->auth, cache, pkt, len, &e->rx_auth_off);
        if (arc != GDP_AUTH_OK) {
            c->drops[GDP_DROP_AUTH_MISSING + arc - GDP_AUTH_MISSING]++;
            return 0;
        }
    }
    /* The verified integrity option is the one critical option we know. */
    int critical = 0, unknown = 0;
    for (uint32_t i = 0; i < h->n_options; i++) {
        int crit = (h->options[i].type & 0x80) != 0;
        critical |= crit;
        unknown |= crit && !(t->auth && h->options[i].data_offset == e->rx_auth_off + 4);
    }
    if (critical != h->critical) {
        c->drops[GDP_DROP_C_BIT_MISMATCH]++;
        return 0;
    }
    if (unknown) {
        c->drops[GDP_DROP_CRITICAL_OPTION]++;
        return 0;
    }
    if (h->oam) {
        send_control(e, idx, pkt, len);
        return 0;
    }
    uint16_t proto = h->protocol;
    if (t->mode == GDP_MODE_TAP ? proto != ETH_P_TEB : proto != ETH_P_IPV4 && proto != ETH_P_IPV6) {
        c->drops[GDP_DROP_WRONG_PROTOCOL]++;
        return 0;
    }
    return 1;
}

/* Delivery: the inner frame's own checks, then to the device (whole, as a super-packet,
 * or into the coalescing buffer). */
static void rx_deliver(struct gdp_engine *e, uint32_t idx, uint8_t *pkt, size_t hlen, size_t len,
                       const struct sockaddr_in6 *from, uint8_t outer_tos, int whole,
                       size_t gso_size) {
    const struct gdp_header *h = &e->rx_hdr;
    struct gdp_tunnel *t = &e->tunnels[idx];
    struct gdp_counters *c = &t->counters;
    uint8_t *f = pkt + hlen;
    size_t flen = len - hlen;
    struct inner in;
    if (parse_inner(f, flen, t->mode, &in) < 0) {
        c->drops[GDP_DROP_INNER_TRUNCATED]++;
        return;
    }
    if (t->mode == GDP_MODE_TUN && in.ipver != (h->protocol == ETH_P_IPV4 ? 4 : 6)) {
        c->drops[GDP_DROP_WRONG_PROTOCOL]++;
        return;
    }
    if (t->mode == GDP_MODE_TAP && !memcmp(f + ETH_SRC_OFF, t->mac, ETH_ALEN)) {
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
            size_t at = e->rx_auth_off - GDP_BASE_HEADER_LEN;
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
    if (whole && rx_super(e, t, f, flen, &in, gso_size))
        return;
    if (t->vnet_hdr) {
        /* Packets merge only with the same GENEVE header. Each carries its own
         * integrity option, verified by now and read by nothing after this: blanked,
         * so the comparison sees only what the peer sends alike. */
        if (t->auth)
            memset(pkt + e->rx_auth_off + GDP_AUTH_OPT_LEN - GDP_AUTH_DATA_LEN, 0, GDP_AUTH_DATA_LEN);
        struct outer_id o = {pkt, hlen, from->sin6_port}; /* sin_port: same place */
        struct gro_seg s;
        int v = gro_offer(&e->gro, idx, f, flen, &in, &o, t->rx_uso, &s);
        if (v == GRO_MERGED)
            return;
        if (v == GRO_START) {
            gro_flush(e);
            gro_start(&e->gro, idx, f, flen, &in, &o, &s);
            return;
        }
    }
    gro_flush(e);
    if (dev_write(t, f, flen) != (ssize_t)flen) {
        c->rx_packets--;
        c->rx_bytes -= flen;
        c->drops[GDP_DROP_DEV_WRITE]++;
    }
}

/* One GENEVE datagram. ``whole``: not reassembled from fragments nor cut from a UDP
 * GRO batch, so it may be a super-packet; ``gso_size``: the segment size the kernel
 * reported for it (0: none). */
static void rx_one(struct gdp_engine *e, uint8_t *pkt, size_t len,
                   const struct sockaddr_in6 *from, uint8_t outer_tos, int whole,
                   size_t gso_size) {
    int hlen = 0;
    uint32_t idx = rx_socket_checks(e, pkt, len, from, &hlen);
    if (idx == e->n || !rx_tunnel_checks(e, idx, pkt, len))
        return;
    rx_deliver(e, idx, pkt, (size_t)hlen, len, from, outer_tos, whole, gso_size);
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

int rx_batch(struct gdp_engine *e) {
    for (int rounds = 0; rounds < 64; rounds++) {
        for (int i = 0; i < e->rx_reset; i++) {
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
        gro_hold(&e->gro); /* its payloads may sit in the buffers this call refills */
        int n = recvmmsg(e->cfg.udp_fd, e->rx_msgs, GDP_BATCH, MSG_DONTWAIT, NULL);
        /* The kernel wrote back the n it filled, and at most tried the next. */
        e->rx_reset = n < 0 ? 1 : (n < GDP_BATCH ? n + 1 : GDP_BATCH);
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
                rx_one(e, p, len, &e->rx_addr[i], tos, !reassembled, gro_size);
                continue;
            }
            /* UDP_GRO: the kernel handed over several same-sized datagrams at once. */
            for (size_t off = 0; off < len; off += gro_size) {
                e->stats->rx_packets++;
                rx_one(e, p + off, len - off < gro_size ? len - off : gro_size, &e->rx_addr[i],
                       tos, 0, 0);
            }
        }
        if (n < GDP_BATCH)
            break;
        /* A full batch: more is waiting, so a super-frame being built may grow on. */
    }
    gro_flush(e); /* never held across a wait for the next packets */
    return 0;
}

void gdp_test_rx_one(struct gdp_engine *e, uint8_t *pkt, size_t len, const uint8_t *src,
                     uint8_t tos, int whole) {
    struct sockaddr_in6 from;
    memset(&from, 0, sizeof(from));
    if (e->cfg.family == 4) {
        struct sockaddr_in *a = (struct sockaddr_in *)&from;
        a->sin_family = AF_INET;
        memcpy(&a->sin_addr, src, 4);
    } else {
        from.sin6_family = AF_INET6;
        memcpy(&from.sin6_addr, src, 16);
    }
    rx_one(e, pkt, len, &from, tos, whole, 0);
    gro_flush(e);
}
