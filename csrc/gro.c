/* Receive coalescing (gro.h). */
#include "gro.h"

#include <string.h>

#include "csum.h"

static int same_outer(const struct gro_state *g, const struct outer_id *o) {
    return g->ghlen == o->ghlen && g->osport == o->sport && !memcmp(g->ghdr, o->ghdr, o->ghlen);
}

void gro_hold(struct gro_state *g) {
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

int gro_finish(struct gro_state *g, struct gro_out *out) {
    if (!g->active)
        return 0;
    g->active = 0;
    out->idx = g->idx;
    out->nseg = g->nseg;
    out->len = GDP_VNET_LEN + g->len;
    memset(out->vh, 0, sizeof(out->vh));
    out->iov[0].iov_base = out->vh;
    out->iov[0].iov_len = GDP_VNET_LEN;
    out->iov[1].iov_base = g->buf;
    out->iov[1].iov_len = g->hdrs;
    memcpy(out->iov + 2, g->piece, g->nseg * sizeof(struct iovec));
    out->n = 2 + (int)g->nseg;
    if (g->nseg == 1)
        return 1; /* as received, checksum included: a zero virtio header claims nothing */
    uint8_t *ip = g->buf + g->ip_off;
    if (g->ipver == 4) {
        ip4_set_tot_len(ip, g->len - g->ip_off);
        ip4_fix_csum(ip);
    } else {
        ip6_set_plen(ip, g->len - g->ip_off - IP6_HLEN);
    }
    int udp = g->proto == IPPROTO_UDP_;
    size_t csum_off = udp ? UDP_CSUM_OFF : TCP_CSUM_OFF;
    if (udp)
        gdp_store16(g->buf + g->l4 + UDP_LEN_OFF, (uint16_t)(g->len - g->l4));
    /* Partial checksum, as a virtio device hands it over: the field holds the
     * pseudo-header sum and the kernel treats the payload as verified (each segment's
     * checksum was checked before it was merged). */
    gdp_store16(g->buf + g->l4 + csum_off, partial_field(ip, g->ipver, g->proto, g->len - g->l4));
    struct vnet_hdr v = {
        .flags = VNET_F_NEEDS_CSUM,
        .gso_type = udp ? VNET_GSO_UDP_L4 : g->ipver == 4 ? VNET_GSO_TCPV4 : VNET_GSO_TCPV6,
        .hdr_len = (uint16_t)g->hdrs,
        .gso_size = (uint16_t)g->mss,
        .csum_start = (uint16_t)g->l4,
        .csum_offset = (uint16_t)csum_off,
    };
    vnet_put(out->vh, &v);
    return 1;
}

void gro_start(struct gro_state *g, uint32_t idx, const uint8_t *f, size_t flen,
               const struct inner *in, const struct outer_id *o, const struct gro_seg *s) {
    g->ip_off = in->ip_off;
    g->ipver = in->ipver;
    g->proto = s->proto;
    g->l4 = s->l4;
    memcpy(g->ghdr, o->ghdr, o->ghlen);
    g->ghlen = o->ghlen;
    g->osport = o->sport;
    memcpy(g->buf, f, s->hdrs);
    g->piece[0].iov_base = (void *)(f + s->hdrs);
    g->piece[0].iov_len = flen - s->hdrs;
    g->held = 0;
    g->active = 1;
    g->idx = idx;
    g->len = flen;
    g->hdrs = s->hdrs;
    g->mss = flen - s->hdrs;
    g->last_plen = flen - s->hdrs;
    g->nseg = 1;
    g->psh = s->psh;
    g->next_seq = s->next_seq;
    g->next_id = s->next_id;
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

/* The UDP half of gro_offer: merge a datagram into a run of same-sized datagrams of its
 * flow whose headers differ only where segmentation rewrites them (lengths, IPv4 ID
 * counting up by one, checksums), so splitting gives back exactly what arrived. */
static int offer_udp(struct gro_state *g, uint32_t idx, const uint8_t *f, size_t flen,
                     const struct inner *in, const struct outer_id *o, struct gro_seg *s) {
    const uint8_t *ip = f + in->ip_off;
    size_t l4 = plain_l4(f, in);
    if (!l4)
        return GRO_SKIP;
    const uint8_t *uh = f + l4;
    size_t hdrs = l4 + UDP_HLEN;
    if (hdrs >= flen || udp_len(uh) != flen - l4)
        return GRO_SKIP; /* no payload, or a length that disagrees with IP's */
    uint16_t cs = udp_csum(uh);
    if (cs == 0 && in->ipver == 6)
        return GRO_SKIP; /* invalid over IPv6: the kernel decides (and counts) */
    if (cs != 0 && !l4_valid(ip, in->ipver, IPPROTO_UDP_, uh, flen - l4))
        return GRO_SKIP; /* a bad checksum: let the kernel see (and count) it */
    size_t plen = flen - hdrs;
    uint16_t id = in->ipver == 4 ? ip4_id(ip) : 0;
    if (g->active && g->proto == IPPROTO_UDP_ && g->idx == idx && g->ipver == in->ipver &&
        g->ip_off == in->ip_off && g->last_plen == g->mss && plen <= g->mss &&
        g->nseg < USO_MAX_SEGS && g->len + plen <= GRO_MAX_LEN &&
        (in->ipver == 6 || id == g->next_id)) {
        const uint8_t *gip = g->buf + g->ip_off;
        int same = same_ip(gip, ip, in->ipver);
        same = same && !memcmp(g->buf + l4, uh, 4) && !memcmp(g->buf, f, in->ip_off) &&
               same_outer(g, o);
        if (same) {
            gro_append(g, f + hdrs, plen);
            g->next_id = (uint16_t)(id + 1);
            return GRO_MERGED;
        }
    }
    *s = (struct gro_seg){IPPROTO_UDP_, l4, hdrs, 0, 0, (uint16_t)(id + 1)};
    return GRO_START;
}

int gro_offer(struct gro_state *g, uint32_t idx, const uint8_t *f, size_t flen,
              const struct inner *in, const struct outer_id *o, int uso, struct gro_seg *s) {
    if (in->ipver && in->proto == IPPROTO_UDP_ && in->ports && uso)
        return offer_udp(g, idx, f, flen, in, o, s);
    if (!in->ipver || in->proto != IPPROTO_TCP_ || !in->ports)
        return GRO_SKIP;
    const uint8_t *ip = f + in->ip_off;
    size_t l4 = plain_l4(f, in);
    if (!l4 || l4 + TCP_HLEN >= flen)
        return GRO_SKIP; /* not plain IP, or no whole TCP header and data */
    const uint8_t *tcp = f + l4;
    size_t doff = tcp_doff(tcp);
    size_t hdrs = l4 + doff;
    uint8_t flags = tcp[TCP_FLAGS_OFF];
    if (doff < TCP_HLEN || hdrs >= flen || hdrs > SEG_INNER_MAX ||
        (flags & ~(TCP_ACK | TCP_PSH)) || !(flags & TCP_ACK))
        return GRO_SKIP; /* only ACK (+PSH) segments that carry data */
    if (!l4_valid(ip, in->ipver, IPPROTO_TCP_, tcp, flen - l4))
        return GRO_SKIP; /* a bad checksum: let the kernel see (and count) it */
    size_t plen = flen - hdrs;
    uint32_t seq = tcp_seq(tcp);
    if (g->active && g->proto == IPPROTO_TCP_ && g->idx == idx && g->ipver == in->ipver &&
        g->hdrs == hdrs && g->l4 == l4 && g->ip_off == in->ip_off && !g->psh &&
        g->next_seq == seq && g->nseg < GRO_MAX_PIECES && g->last_plen == g->mss &&
        plen <= g->mss && g->len + plen <= GRO_MAX_LEN) {
        const uint8_t *gip = g->buf + g->ip_off;
        const uint8_t *gtcp = g->buf + l4;
        /* Alike but for the sequence number, the flags' PSH and the checksum. */
        int same = same_ip(gip, ip, in->ipver);
        same = same && !memcmp(gtcp, tcp, 4) && !memcmp(gtcp + 8, tcp + 8, 5) &&
               !memcmp(gtcp + 14, tcp + 14, 2) && !memcmp(gtcp + 18, tcp + 18, doff - 18) &&
               !memcmp(g->buf, f, in->ip_off) && same_outer(g, o);
        if (same) {
            gro_append(g, f + hdrs, plen);
            g->next_seq += (uint32_t)plen;
            if (flags & TCP_PSH) {
                g->buf[l4 + TCP_FLAGS_OFF] |= TCP_PSH;
                g->psh = 1;
            }
            return GRO_MERGED;
        }
    }
    *s = (struct gro_seg){IPPROTO_TCP_, l4, hdrs, (flags & TCP_PSH) != 0,
                          seq + (uint32_t)plen, 0};
    return GRO_START;
}
