/* Transmit encapsulation: the GENEVE header and the outer IP and UDP headers of each
 * tunnel are built once (gdp_tunnel_prepare) and patched per packet: source port from
 * the inner flow hash, lengths, outer TOS (RFC 6040), IPv4 ID and DF, UDP checksum.
 * Frames read from the device sit at buffer + GDP_HEADROOM; headers go in front. */
#include "engine_int.h"

#include <string.h>

#include "csum.h"

int gdp_tunnel_prepare(struct gdp_tunnel *t) {
    if ((t->family != 4 && t->family != 6) || (t->mode != GDP_MODE_TAP && t->mode != GDP_MODE_TUN))
        return GDP_E_ENGINE_CONFIG;
    if (t->reflect && (t->reflect_slots == 0 || (t->reflect_slots & (t->reflect_slots - 1))))
        return GDP_E_ENGINE_CONFIG;
    /* Authenticated: the options end with the integrity option (signed in place at
     * hdr_len - GDP_AUTH_OPT_LEN), and nothing is injected (one MAC per wire packet). */
    if (t->auth && (t->inject || t->opts_len < GDP_AUTH_OPT_LEN ||
                    t->opts[t->opts_len - GDP_AUTH_OPT_LEN + 2] != GDP_AUTH_OPT_TYPE ||
                    (t->opts[t->opts_len - GDP_AUTH_OPT_LEN + 3] & 0x1F) * 4 != GDP_AUTH_DATA_LEN))
        return GDP_E_ENGINE_CONFIG;
    int rc = gdp_encode(t->vni, t->mode == GDP_MODE_TAP ? ETH_P_TEB : ETH_P_IPV4, 0, t->opts,
                        t->opts_len, t->hdr, sizeof(t->hdr));
    if (rc < 0)
        return GDP_E_ENGINE_HEADER;
    t->hdr_len = (uint32_t)rc;
    int ipver = t->family;
    size_t iplen = ip_base_hlen(ipver);
    uint32_t outer = (uint32_t)(iplen + UDP_HLEN) + t->hdr_len;
    if (t->underlay_mtu <= outer + ETH_HLEN)
        return GDP_E_ENGINE_CONFIG;
    t->max_inner = t->underlay_mtu - outer;
    uint8_t *ip = t->outer;
    memset(t->outer, 0, sizeof(t->outer));
    size_t alen = ip_alen(ipver);
    if (ipver == 4) {
        ip[0] = 0x45;
        ip[IP4_TTL_OFF] = t->ttl;
        ip[IP4_PROTO_OFF] = IPPROTO_UDP_;
    } else {
        ip[0] = 0x60;
        ip[IP6_NEXT_OFF] = IPPROTO_UDP_;
        ip[IP6_HOP_OFF] = t->ttl;
    }
    memcpy((uint8_t *)ip_saddr(ip, ipver), t->local, alen);
    memcpy((uint8_t *)ip_daddr(ip, ipver), t->remote, alen);
    gdp_store16(ip + iplen + 2, t->port);
    t->outer_psum = pseudo_sum(ip, ipver, IPPROTO_UDP_, 0);
    return 0;
}

uint8_t *put_udp_ip(struct gdp_engine *e, struct gdp_tunnel *t, uint32_t hash,
                    const struct inner *in, int df, uint8_t *g, size_t glen, const uint8_t *rest,
                    size_t rest_len) {
    size_t iplen = ip_base_hlen(t->family);
    size_t udplen = UDP_HLEN + glen + rest_len;
    uint8_t *u = g - UDP_HLEN;
    uint8_t *ip = u - iplen;
    memcpy(ip, t->outer, iplen + UDP_HLEN);
    uint16_t sport = (uint16_t)(e->cfg.sport_min +
                                (((uint64_t)hash *
                                  (uint64_t)(e->cfg.sport_max - e->cfg.sport_min + 1)) >> 32));
    if (t->n_gso) /* the flow's port must not depend on which path sends a packet */
        sport = t->gso_ports[((uint64_t)hash * (uint64_t)t->n_gso) >> 32];
    gdp_store16(u, sport);
    gdp_store16(u + UDP_LEN_OFF, (uint16_t)udplen);
    if (t->udp_csum) {
        /* An even glen lets the sum run over the two parts in turn. */
        uint64_t sum = csum_partial(u, UDP_HLEN + glen, t->outer_psum + (uint32_t)udplen);
        if (rest_len)
            sum = csum_partial(rest, rest_len, sum);
        gdp_store16(u + UDP_CSUM_OFF, udp_csum_wire(csum_fold(sum)));
    }
    uint8_t tos = tx_tos(t, in);
    if (!t->ttl) /* ttl inherit: the template has none */
        ip[t->family == 4 ? IP4_TTL_OFF : IP6_HOP_OFF] = tx_ttl(t, in);
    if (t->family == 4) {
        ip[IP4_TOS_OFF] = tos;
        ip4_set_tot_len(ip, iplen + udplen);
        /* A nonzero ID of our own: with ID 0 the kernel would pick one per datagram and
         * the fragments of one packet would not share it. */
        if (++e->ip_id == 0 || (e->ip_id & 0xFFFF) == 0)
            e->ip_id++;
        ip4_set_id(ip, (uint16_t)e->ip_id);
        ip4_set_frag(ip, df ? IP_DF : 0);
    } else {
        gdp_store32(ip, 0x60000000u | (uint32_t)tos << 20);
        ip6_set_plen(ip, udplen);
    }
    return ip;
}

/* ICMP too-big back into the device, as the kernel's tunnel PMTU check does. Returns 1
 * if this packet gets one (a failed write is counted), 0 if not. */
static int send_too_big(struct gdp_engine *e, struct gdp_tunnel *t, const uint8_t *f,
                        const struct inner *in) {
    size_t l2 = t->mode == GDP_MODE_TAP ? ETH_HLEN : 0;
    size_t len = icmp_too_big(f, in, t->mode == GDP_MODE_TAP, t->max_inner - (uint32_t)l2,
                              e->icmp);
    if (!len)
        return 0;
    if (dev_write(t, e->icmp, len) < 0)
        t->counters.drops[GDP_DROP_DEV_WRITE]++;
    return 1;
}

/* The GENEVE header of a packet: the tunnel's template, or with the reverse flow's
 * options appended (reflect_options) when the packet still fits ``room`` then. */
static const uint8_t *pick_header(struct gdp_engine *e, struct gdp_tunnel *t, const uint8_t *f,
                                  const struct inner *in, size_t fixed, size_t *hlen) {
    *hlen = t->hdr_len;
    if (!t->reflect || !in->ipver)
        return t->hdr;
    uint8_t opts[GDP_MAX_OPTIONS_LEN * 2];
    memcpy(opts, t->opts, t->opts_len);
    size_t extra = reflect_lookup(t, f, in, opts + t->opts_len);
    size_t olen = t->opts_len + extra;
    /* Reflection never makes a packet that fitted need fragments. */
    if (extra && olen <= GDP_MAX_OPTIONS_LEN && fixed + extra <= t->max_inner) {
        int rc = gdp_encode(t->vni, ETH_P_TEB, 0, opts, olen, e->hdr_scratch,
                            sizeof(e->hdr_scratch));
        if (rc > 0) {
            *hlen = (size_t)rc;
            return e->hdr_scratch;
        }
    }
    return t->hdr;
}

void tx_one(struct gdp_engine *e, struct tx_state *st, uint32_t idx, uint8_t *buf, size_t flen) {
    struct gdp_tunnel *t = &e->tunnels[idx];
    struct gdp_counters *c = &t->counters;
    uint8_t *f = buf + GDP_HEADROOM;
    struct inner in;
    if (parse_inner(f, flen, t->mode, &in) < 0) {
        c->drops[GDP_DROP_TX_BAD_FRAME]++;
        return;
    }
    size_t hlen = t->hdr_len;
    const uint8_t *hdr = flen <= t->max_inner ? pick_header(e, t, f, &in, flen, &hlen) : t->hdr;
    uint8_t *g = f - hlen;
    memcpy(g, hdr, hlen);
    gdp_store16(g + 2, geneve_proto(t, in.ipver));
    if (t->auth && gdp_auth_sign(t->auth, g, hlen + flen, t->hdr_len - GDP_AUTH_OPT_LEN) < 0) {
        c->drops[GDP_DROP_TX_ERROR]++;
        return;
    }

    size_t iplen = ip_base_hlen(t->family);
    size_t udplen = UDP_HLEN + hlen + flen;
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
        add_udp_slot(e, st, idx, hash, tx_tos(t, &in), g, hlen + flen, NULL, 0,
                     (uint32_t)flen);
        return;
    }
    /* Authenticated, with UDP GSO: runs of signed packets leave in one send each. */
    if (!frags && t->auth && t->n_gso) {
        gso_batch_add(e, st, idx, hash, tx_tos(t, &in), g, hlen + flen, (uint32_t)flen);
        return;
    }
    uint8_t *ip = put_udp_ip(e, t, hash, &in, df, g, hlen + flen, NULL, 0);
    uint8_t *u = g - UDP_HLEN;
    if (!frags) {
        add_slot(e, st, idx, ip, total, NULL, 0, (uint32_t)flen, 1);
        return;
    }
    /* Fragment the outer packet, as the kernel does for a tunnel with DF unset. The
     * raw socket sends exactly what it is given (EMSGSIZE above the device MTU). */
    size_t fh = t->family == 4 ? IP4_HLEN : IP6_HLEN + IP6_FRAG_HLEN;
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
            memcpy(fhdr, ip, IP4_HLEN);
            ip4_set_tot_len(fhdr, IP4_HLEN + n);
            ip4_set_frag(fhdr, (uint16_t)((off / 8) | (more ? IP_MF : 0)));
        } else {
            memcpy(fhdr, ip, IP6_HLEN);
            fhdr[IP6_NEXT_OFF] = IPPROTO_FRAG6_;
            ip6_set_plen(fhdr, IP6_FRAG_HLEN + n);
            uint8_t *fr = fhdr + IP6_HLEN;
            fr[0] = IPPROTO_UDP_;
            fr[1] = 0;
            gdp_store16(fr + 2, (uint16_t)(off | (more ? 1 : 0)));
            gdp_store32(fr + 4, e->ip_id);
        }
        add_slot(e, st, idx, fhdr, fh, u + off, n, (uint32_t)flen, !more);
    }
    c->tx_fragmented++;
}

void tx_plain(struct gdp_engine *e, struct tx_state *st, uint32_t idx, uint8_t *buf,
              size_t flen, int partial, size_t cstart, size_t coff) {
    uint8_t *f = buf + GDP_HEADROOM;
    if (partial) {
        if (cstart + coff + 2 > flen) {
            e->tunnels[idx].counters.drops[GDP_DROP_TX_BAD_FRAME]++;
            return;
        }
        csum_complete(f + cstart, flen - cstart, coff);
    }
    tx_one(e, st, idx, buf, flen);
}

/* A frame from a device with a virtio header: complete a partial checksum, or cut a
 * TCP super-frame into MSS-sized segments (what the kernel's GSO would do), each
 * encapsulated on its own, unless the inject device takes it whole. The header sits
 * right in front of the frame. */
void tx_vnet(struct gdp_engine *e, struct tx_state *st, uint32_t idx, uint8_t *buf, size_t flen) {
    struct gdp_tunnel *t = &e->tunnels[idx];
    struct gdp_counters *c = &t->counters;
    uint8_t *f = buf + GDP_HEADROOM;
    struct vnet_hdr v = vnet_get(f - GDP_VNET_LEN);
    struct inner in;
    if ((v.gso_type & (uint8_t)~VNET_GSO_ECN) == VNET_GSO_NONE) {
        if (t->inject && parse_inner(f, flen, t->mode, &in) == 0 &&
            uso_add(e, st, idx, buf, flen, &v, &in))
            return;
        uso_flush_all(e, st); /* a flow's run goes before anything else it sends */
        tx_plain(e, st, idx, buf, flen, v.flags & VNET_F_NEEDS_CSUM, v.csum_start,
                 v.csum_offset);
        return;
    }
    struct seg_plan p;
    if (seg_tcp_plan(f, flen, t->mode, &v, &in, &p) < 0) {
        c->drops[GDP_DROP_TX_BAD_FRAME]++;
        return;
    }
    c->tx_gso_frames++;
    size_t hdrs = p.hdrs;
    size_t mss = p.mss;
    size_t hlen;
    const uint8_t *hdr = pick_header(e, t, f, &in, hdrs + mss, &hlen);
    if (hdrs + mss + (hlen - t->hdr_len) > t->max_inner) {
        /* Segments the underlay cannot carry (only an explicit tunnel MTU above the
         * path allows this): the ICMP error tells the sender's TCP the path MTU, as
         * the kernel's tunnel PMTU check does for GSO packets. */
        send_too_big(e, t, f, &in);
        c->drops[GDP_DROP_TOO_BIG]++;
        return;
    }
    int df = outer_df(t, &in);
    uint32_t hash = hash_inner(f, flen, &in, e->cfg.hash_seed);
    if (t->inject && tx_inject(e, st, t, &v, f, flen, &in, &p, hdr, hlen, df, hash))
        return;
    uint16_t proto = geneve_proto(t, in.ipver);
    size_t outer_room = ip_base_hlen(t->family) + UDP_HLEN + hlen;
    int udp_gso = t->n_gso > 0 && !t->gso_nocsum;
    size_t nseg = 0; /* segments waiting in e->gso_iov (UDP GSO path) */
    uint8_t tos = tx_tos(t, &in);
    if (udp_gso)
        tx_send(e, st); /* the scratch headers below are reused from slot 0 */
    size_t per_send = GSO_MAX_BYTES / (hlen + hdrs + mss);
    if (per_send > GSO_MAX_SEGS)
        per_send = GSO_MAX_SEGS;
    for (size_t off = hdrs, i = 0; off < flen; off += mss, i++) {
        size_t n = flen - off < mss ? flen - off : mss;
        int last = off + n >= flen;
        if (!udp_gso && st->slots >= TX_SLOTS)
            tx_send(e, st);
        uint8_t *sh = e->tx_seghdr[udp_gso ? nseg : (size_t)st->slots];
        uint8_t *ih = sh + outer_room; /* this segment's inner headers */
        seg_tcp_headers(f, &p, i, off, n, last, ih);
        uint8_t *g = ih - hlen;
        memcpy(g, hdr, hlen);
        gdp_store16(g + 2, proto);
        /* One MAC per segment, over the segment as it goes on the wire. */
        if (t->auth && gdp_auth_sign2(t->auth, g, hlen + hdrs, f + off, n,
                                      t->hdr_len - GDP_AUTH_OPT_LEN, e->auth_seg,
                                      sizeof(e->auth_seg)) < 0) {
            t->counters.drops[GDP_DROP_TX_ERROR]++;
            if (udp_gso && last && nseg)
                gso_send(e, t, hash, tos, nseg, hlen + hdrs + mss);
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
                gso_send(e, t, hash, tos, nseg, hlen + hdrs + mss);
                nseg = 0;
            }
        } else if (t->n_gso) {
            /* No UDP checksum: one datagram per segment on the flow's socket. */
            add_udp_slot(e, st, idx, hash, tos, g, hlen + hdrs, f + off, n, (uint32_t)(hdrs + n));
        } else {
            uint8_t *ip = put_udp_ip(e, t, hash, &in, df, g, hlen + hdrs, f + off, n);
            add_slot(e, st, idx, ip, outer_room + hdrs, f + off, n, (uint32_t)(hdrs + n), 1);
        }
    }
}
