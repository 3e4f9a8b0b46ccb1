/* Transmit through the inject device (a TAP with UDP tunnel GSO, Linux 6.17+): a TSO
 * super-frame, or a run of UDP datagrams of one flow as one UDP_L4 super-frame, is
 * written whole behind its outer headers. The kernel routes it to the underlay like a
 * packet it forwards, passes it whole through a veth, and otherwise cuts it into
 * segments that each carry all of the outer headers (GENEVE options included), as for
 * its own tunnels. IPv4 underlay without UDP checksum only. */
#include "engine_int.h"

#include <net/if.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include "csum.h"

/* An answer of "up" from underlay_up stands this long: a link that goes down then
 * loses at most that much injected traffic unseen, like the frames already queued on
 * it. */
#define UNDERLAY_RECHECK_NS 1000000

/* Whether the underlay device is up and running. While it is down nothing is
 * injected: the sockets then fail, and count, what the kernel would drop unseen
 * behind the inject device. */
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

/* Fill e->inj_hdr: the inject device's virtio header, then Ethernet, outer IPv4 and
 * UDP and the GENEVE header for an inner super-frame of ``ilen`` bytes, GSO as ``v``
 * says with its offsets taken from the inner frame's start. */
static void inj_outer(struct gdp_engine *e, struct gdp_tunnel *t, const uint8_t *hdr,
                      size_t hlen, const struct inner *in, int df, uint32_t hash, size_t ilen,
                      struct vnet_hdr v) {
    size_t outer = INJ_OUTER + hlen;
    uint8_t *g = e->inj_hdr + VNET_TUNNEL_LEN + INJ_OUTER;
    memcpy(g, hdr, hlen);
    gdp_store16(g + 2, geneve_proto(t, in->ipver));
    uint8_t *ip = put_udp_ip(e, t, hash, in, df, g, hlen, NULL, ilen);
    ip[IP4_TTL_OFF] = (uint8_t)(t->ttl + 1); /* forwarding takes one off (ttl < 255) */
    ip4_set_csum(ip, inet_csum(ip, IP4_HLEN));
    uint8_t *eth = ip - ETH_HLEN;
    memcpy(eth + ETH_DST_OFF, t->inj_mac, ETH_ALEN);
    memcpy(eth + ETH_SRC_OFF, t->inj_mac, ETH_ALEN);
    eth[ETH_SRC_OFF] ^= 0x02; /* any unicast source but the device's own */
    gdp_store16(eth + ETH_TYPE_OFF, ETH_P_IPV4);
    uint8_t *vh = e->inj_hdr;
    memset(vh, 0, VNET_TUNNEL_LEN);
    v.flags = VNET_F_NEEDS_CSUM;
    v.gso_type |= VNET_GSO_UDP_TUNNEL_IPV4;
    v.hdr_len = (uint16_t)(outer + v.hdr_len);
    v.csum_start = (uint16_t)(outer + v.csum_start);
    vnet_put(vh, &v);
    store16le(vh + VNET_OUTER_TH_OFF, ETH_HLEN + IP4_HLEN);
    store16le(vh + VNET_INNER_NH_OFF, outer + in->ip_off);
}

int tx_inject(struct gdp_engine *e, struct tx_state *st, struct gdp_tunnel *t,
              const struct vnet_hdr *v, const uint8_t *f, size_t flen, const struct inner *in,
              const struct seg_plan *p, const uint8_t *hdr, size_t hlen, int df, uint32_t hash) {
    size_t outer = INJ_OUTER + hlen;
    /* A frame that fits one underlay packet stays here: the receiver takes a whole
     * datagram for a super-packet only when it is bigger than one underlay packet
     * could be (anything else might be a sender's complete packet). */
    if (t->family != 4 || t->udp_csum || flen <= t->max_inner || outer - ETH_HLEN + flen > 65535 ||
        v->csum_offset != TCP_CSUM_OFF || !(v->flags & VNET_F_NEEDS_CSUM) || !underlay_up(e, t))
        return 0;
    tx_send(e, st); /* what the flow sent before it is sent first */
    size_t mss = v->gso_size;
    struct vnet_hdr iv = {.gso_type = v->gso_type, .hdr_len = (uint16_t)p->hdrs,
                          .gso_size = (uint16_t)mss, .csum_start = (uint16_t)p->l4,
                          .csum_offset = TCP_CSUM_OFF};
    inj_outer(e, t, hdr, hlen, in, df, hash, flen, iv);
    struct iovec iov[2] = {{e->inj_hdr, VNET_TUNNEL_LEN + outer}, {(void *)f, flen}};
    if (writev(t->inj_fd, iov, 2) != (ssize_t)(VNET_TUNNEL_LEN + outer + flen))
        return 0;
    size_t nseg = (flen - p->hdrs + mss - 1) / mss;
    e->ip_id += (uint32_t)nseg - 1; /* the kernel numbers the segments on from ours */
    struct gdp_counters *c = &t->counters;
    c->tx_injected++;
    st->done = 1;
    c->tx_packets += nseg;
    c->tx_bytes += flen - p->hdrs + nseg * p->hdrs; /* each segment's inner frame */
    return 1;
}

/* Send a UDP run as one super-frame through the inject device; a run of one, or one
 * the device refuses, leaves datagram by datagram. */
static void uso_flush(struct gdp_engine *e, struct tx_state *st, struct uso_run *r) {
    if (!r->active)
        return;
    r->active = 0;
    struct gdp_tunnel *t = &e->tunnels[r->idx];
    size_t hdrs = r->l4 + UDP_HLEN;
    size_t plen = r->flen - hdrs;
    size_t slen = hdrs + r->nseg * plen;
    size_t outer = INJ_OUTER + t->hdr_len;
    if (r->nseg > 1 && t->inject && outer - ETH_HLEN + slen <= 65535 && underlay_up(e, t)) {
        tx_send(e, st); /* what the flow sent before the run leaves first */
        seg_uso_headers(r->buf + GDP_HEADROOM, r->ip_off, r->l4, slen, e->uso_hdr);
        struct inner in = {.ipver = ip_version(e->uso_hdr + r->ip_off), .ip_off = r->ip_off,
                           .ecn = r->ecn};
        struct vnet_hdr iv = {.gso_type = VNET_GSO_UDP_L4, .hdr_len = (uint16_t)hdrs,
                              .gso_size = (uint16_t)plen, .csum_start = (uint16_t)r->l4,
                              .csum_offset = UDP_CSUM_OFF};
        inj_outer(e, t, t->hdr, t->hdr_len, &in, r->df, r->hash, slen, iv);
        struct iovec *v = e->uso_iov;
        v[0].iov_base = e->inj_hdr;
        v[0].iov_len = VNET_TUNNEL_LEN + outer;
        v[1].iov_base = e->uso_hdr;
        v[1].iov_len = hdrs;
        for (uint32_t k = 0; k < r->nseg; k++) {
            v[2 + k].iov_base = r->bufs[k] + GDP_HEADROOM + hdrs;
            v[2 + k].iov_len = plen;
        }
        if (writev(t->inj_fd, v, (int)r->nseg + 2) == (ssize_t)(VNET_TUNNEL_LEN + outer + slen)) {
            e->ip_id += r->nseg - 1;
            struct gdp_counters *c = &t->counters;
            c->tx_injected++;
            c->tx_packets += r->nseg;
            c->tx_bytes += r->nseg * r->flen;
            return;
        }
    }
    for (uint32_t k = 0; k < r->nseg; k++)
        tx_plain(e, st, r->idx, r->bufs[k], r->flen, 1, r->l4, UDP_CSUM_OFF);
}

void uso_flush_all(struct gdp_engine *e, struct tx_state *st) {
    for (int k = 0; k < USO_RUNS; k++)
        uso_flush(e, st, &e->uso[k]);
}

int uso_growing(const struct gdp_engine *e) {
    for (int k = 0; k < USO_RUNS; k++)
        if (e->uso[k].active && e->uso[k].nseg >= 2)
            return 1;
    return 0;
}

static int same_bytes(const uint8_t *a, const uint8_t *b, size_t from, size_t to) {
    return !memcmp(a + from, b + from, to - from);
}

int uso_add(struct gdp_engine *e, struct tx_state *st, uint32_t idx, uint8_t *buf, size_t flen,
            const struct vnet_hdr *v, const struct inner *in) {
    struct gdp_tunnel *t = &e->tunnels[idx];
    const uint8_t *f = buf + GDP_HEADROOM;
    size_t ipo = in->ip_off;
    size_t l4 = ipo + ip_base_hlen(in->ipver);
    if (!t->inject || t->reflect || !in->ipver || in->proto != IPPROTO_UDP_ || !in->ports ||
        !(v->flags & VNET_F_NEEDS_CSUM) || v->csum_start != l4 || v->csum_offset != UDP_CSUM_OFF ||
        flen <= l4 + UDP_HLEN || flen > t->max_inner || udp_len(f + l4) != flen - l4)
        return 0;
    const uint8_t *ip = f + ipo;
    if (in->ipver == 4 ? ip[0] != 0x45 || ip4_tot_len(ip) != flen - ipo : ip6_plen(ip) != flen - l4)
        return 0;
    size_t addr_from = ipo + (in->ipver == 4 ? 12 : 8);
    for (int k = 0; k < USO_RUNS; k++) {
        struct uso_run *r = &e->uso[k];
        if (!r->active || r->idx != idx || r->ip_off != ipo)
            continue;
        const uint8_t *f0 = r->buf + GDP_HEADROOM;
        if (r->l4 != l4 || !same_bytes(f0, f, addr_from, l4 + 4))
            continue; /* another flow */
        /* Alike but for the IPv4 ID (the next one), its header checksum, and the UDP
         * checksum. */
        int alike = r->flen == flen && same_bytes(f0, f, 0, ipo) &&
                    (in->ipver == 6 ? same_bytes(f0, f, ipo, l4 + UDP_HLEN)
                                    : same_bytes(f0, f, ipo, ipo + 4) &&
                                          same_bytes(f0, f, ipo + 6, ipo + 10) &&
                                          same_bytes(f0, f, ipo + 12, l4 + UDP_HLEN) &&
                                          ip4_id(ip) == r->next_id);
        size_t room = INJ_OUTER - ETH_HLEN + t->hdr_len + l4 + UDP_HLEN +
                      (r->nseg + 1) * (flen - l4 - UDP_HLEN);
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
    r->next_id = (uint16_t)(in->ipver == 4 ? ip4_id(ip) + 1 : 0);
    r->hash = hash_inner(f, flen, in, e->cfg.hash_seed);
    r->df = outer_df(t, in);
    r->ecn = in->ecn;
    r->nseg = 1;
    r->bufs[0] = buf;
    return 1;
}
