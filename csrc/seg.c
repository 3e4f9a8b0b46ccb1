/* Segmentation (seg.h). */
#include "seg.h"

#include <string.h>

#include "csum.h"

int seg_tcp_plan(const uint8_t *f, size_t flen, int mode, const struct vnet_hdr *v,
                 struct inner *in, struct seg_plan *p) {
    uint8_t gso = v->gso_type & (uint8_t)~VNET_GSO_ECN;
    if ((gso != VNET_GSO_TCPV4 && gso != VNET_GSO_TCPV6) || v->gso_size == 0 ||
        parse_inner(f, flen, mode, in) < 0 || in->ipver != (gso == VNET_GSO_TCPV4 ? 4 : 6) ||
        in->proto != IPPROTO_TCP_ || (size_t)v->csum_start + TCP_HLEN > flen)
        return -1;
    size_t l4 = v->csum_start; /* the TCP header: where its checksum starts */
    if (l4 < l4_off(f, in))
        return -1; /* inside the IP header: its fields would be both IP and TCP */
    size_t hdrs = l4 + tcp_doff(f + l4);
    if (hdrs > flen || hdrs > SEG_INNER_MAX || hdrs < l4 + TCP_HLEN)
        return -1;
    p->ipver = in->ipver;
    p->ipo = in->ip_off;
    p->l4 = l4;
    p->hdrs = hdrs;
    p->mss = v->gso_size;
    p->ip_id = in->ipver == 4 ? ip4_id(f + in->ip_off) : 0;
    p->seq = tcp_seq(f + l4);
    p->flags = f[l4 + TCP_FLAGS_OFF];
    return 0;
}

void seg_tcp_headers(const uint8_t *f, const struct seg_plan *p, size_t i, size_t off,
                     size_t n, int last, uint8_t *ih) {
    memcpy(ih, f, p->hdrs);
    uint8_t *sip = ih + p->ipo;
    if (p->ipver == 4) {
        ip4_set_tot_len(sip, p->hdrs - p->ipo + n);
        ip4_set_id(sip, (uint16_t)(p->ip_id + i));
        ip4_fix_csum(sip);
    } else {
        ip6_set_plen(sip, p->hdrs - p->ipo - IP6_HLEN + n);
    }
    uint8_t *tcp = ih + p->l4;
    gdp_store32(tcp + TCP_SEQ_OFF, p->seq + (uint32_t)(off - p->hdrs));
    uint8_t fl = p->flags;
    if (!last)
        fl &= (uint8_t)~(TCP_FIN | TCP_PSH);
    if (i)
        fl &= (uint8_t)~TCP_CWR;
    tcp[TCP_FLAGS_OFF] = fl;
    gdp_store16(tcp + TCP_CSUM_OFF, 0);
    uint64_t sum = pseudo_sum(sip, p->ipver, IPPROTO_TCP_, p->hdrs - p->l4 + n);
    sum = csum_partial(tcp, p->hdrs - p->l4, sum);
    sum = csum_partial(f + off, n, sum);
    gdp_store16(tcp + TCP_CSUM_OFF, csum_fold(sum));
}

void seg_uso_headers(const uint8_t *f0, size_t ip_off, size_t l4, size_t slen, uint8_t *out) {
    memcpy(out, f0, l4 + UDP_HLEN);
    uint8_t *ip = out + ip_off;
    if (ip_version(ip) == 4) {
        ip4_set_tot_len(ip, slen - ip_off);
        ip4_fix_csum(ip);
    } else {
        ip6_set_plen(ip, slen - l4);
    }
}

int super_plan(const uint8_t *f, size_t flen, const struct inner *in, int uso,
               uint32_t max_inner, uint32_t dev_mtu, size_t gso_size, struct super_plan *p) {
    if (!in->ipver || (in->proto != IPPROTO_TCP_ && in->proto != IPPROTO_UDP_) || !in->ports)
        return 0;
    const uint8_t *ip = f + in->ip_off;
    size_t l4 = l4_off(f, in);
    if (in->ip_off + ip_total(ip, in->ipver) != flen)
        return 0;
    int udp = in->proto == IPPROTO_UDP_;
    size_t hdrs, seg;
    if (udp) {
        /* The UDP length is one datagram's (8 + segment size) while the IP packet
         * holds several, and the kernel reported that segment size for the datagram
         * (UDP_GRO): cut where the sender's stack would, never into more datagrams
         * than the kernel says arrived. */
        if (!uso || l4 + UDP_HLEN > flen)
            return 0;
        size_t ulen = udp_len(f + l4);
        hdrs = l4 + UDP_HLEN;
        if (ulen <= UDP_HLEN || l4 + ulen >= flen || gso_size != ulen - UDP_HLEN ||
            !is_partial_field(ip, in->ipver, IPPROTO_UDP_, ulen, udp_csum(f + l4)))
            return 0;
        seg = ulen - UDP_HLEN;
    } else {
        /* Longer than one underlay packet could carry; the segment size is taken from
         * the device MTU (the sender's is not carried, and TCP is a stream). */
        if (flen <= max_inner || l4 + TCP_HLEN > flen)
            return 0;
        hdrs = l4 + tcp_doff(f + l4);
        if (hdrs < l4 + TCP_HLEN || hdrs >= flen ||
            !is_partial_field(ip, in->ipver, IPPROTO_TCP_, flen - l4,
                              gdp_load16(f + l4 + TCP_CSUM_OFF)))
            return 0;
        size_t l3hdrs = hdrs - in->ip_off;
        seg = dev_mtu > l3hdrs ? dev_mtu - l3hdrs : 0;
    }
    size_t payload = flen - hdrs;
    p->udp = udp;
    p->l4 = l4;
    p->hdrs = hdrs;
    p->seg = seg;
    p->nseg = seg ? (payload + seg - 1) / seg : 1;
    return 1;
}

void super_vnet(uint8_t *f, size_t flen, const struct inner *in, const struct super_plan *p,
                uint8_t vh[GDP_VNET_LEN]) {
    struct vnet_hdr v = {.flags = VNET_F_NEEDS_CSUM};
    size_t l4 = p->l4;
    if (p->udp) {
        /* The kernel's UDP takes the length as the whole frame's and splits it at the
         * segment size, fixing each datagram's length and checksum. */
        uint8_t *ip = f + in->ip_off;
        gdp_store16(f + l4 + UDP_LEN_OFF, (uint16_t)(flen - l4));
        gdp_store16(f + l4 + UDP_CSUM_OFF, partial_field(ip, in->ipver, IPPROTO_UDP_, flen - l4));
        v.gso_type = VNET_GSO_UDP_L4;
    } else if (p->seg && flen - p->hdrs > p->seg) {
        v.gso_type = in->ipver == 4 ? VNET_GSO_TCPV4 : VNET_GSO_TCPV6;
        if (f[l4 + TCP_FLAGS_OFF] & TCP_CWR)
            v.gso_type |= VNET_GSO_ECN;
    }
    if (v.gso_type) {
        v.hdr_len = (uint16_t)p->hdrs;
        v.gso_size = (uint16_t)p->seg;
    }
    v.csum_start = (uint16_t)l4;
    v.csum_offset = p->udp ? UDP_CSUM_OFF : TCP_CSUM_OFF;
    memset(vh, 0, GDP_VNET_LEN);
    vnet_put(vh, &v);
}

size_t icmp_too_big(const uint8_t *f, const struct inner *in, int tap, uint32_t mtu,
                    uint8_t *out) {
    const uint8_t *ip = f + in->ip_off;
    size_t l2 = tap ? ETH_HLEN : 0;
    uint8_t *oip = out + l2;
    size_t total;
    if (in->ipver == 4) {
        size_t ihl = ip4_ihl(ip);
        if (!in->df || mtu < 576)
            return 0;
        if (ip[IP4_PROTO_OFF] == IPPROTO_ICMP_ && in->ip_len > ihl) {
            uint8_t type = ip[ihl];
            if (type == 3 || type == 4 || type == 5 || type == 11 || type == 12)
                return 0; /* never an ICMP error about an ICMP error */
        }
        size_t quote = in->ip_len < 548 ? in->ip_len : 548;
        total = IP4_HLEN + ICMP_HLEN + quote;
        memset(oip, 0, IP4_HLEN + ICMP_HLEN);
        oip[0] = 0x45;
        ip4_set_tot_len(oip, total);
        oip[IP4_TTL_OFF] = 64;
        oip[IP4_PROTO_OFF] = IPPROTO_ICMP_;
        memcpy(oip + 12, ip_daddr(ip, 4), 4);
        memcpy(oip + 16, ip_saddr(ip, 4), 4);
        ip4_set_csum(oip, inet_csum(oip, IP4_HLEN));
        uint8_t *ic = oip + IP4_HLEN;
        ic[0] = ICMP_DEST_UNREACH;
        ic[1] = ICMP_FRAG_NEEDED;
        gdp_store16(ic + 6, (uint16_t)mtu);
        memcpy(ic + ICMP_HLEN, ip, quote);
        gdp_store16(ic + 2, inet_csum(ic, ICMP_HLEN + quote));
    } else {
        if (mtu < 1280)
            return 0;
        if (ip[IP6_NEXT_OFF] == IPPROTO_ICMPV6_ && in->ip_len > IP6_HLEN && ip[IP6_HLEN] < 128)
            return 0; /* never an ICMPv6 error about an error */
        size_t quote = in->ip_len < 1232 ? in->ip_len : 1232;
        total = IP6_HLEN + ICMP_HLEN + quote;
        memset(oip, 0, IP6_HLEN + ICMP_HLEN);
        oip[0] = 0x60;
        ip6_set_plen(oip, ICMP_HLEN + quote);
        oip[IP6_NEXT_OFF] = IPPROTO_ICMPV6_;
        oip[IP6_HOP_OFF] = 64;
        memcpy(oip + 8, ip_daddr(ip, 6), 16);
        memcpy(oip + 24, ip_saddr(ip, 6), 16);
        uint8_t *ic = oip + IP6_HLEN;
        ic[0] = ICMPV6_PKT_TOOBIG;
        gdp_store32(ic + 4, mtu);
        memcpy(ic + ICMP_HLEN, ip, quote);
        gdp_store16(ic + 2, l4_csum(oip, 6, IPPROTO_ICMPV6_, ic, ICMP_HLEN + quote));
    }
    if (l2) {
        memcpy(out + ETH_DST_OFF, f + ETH_SRC_OFF, ETH_ALEN); /* to the sender */
        memcpy(out + ETH_SRC_OFF, f + ETH_DST_OFF, ETH_ALEN); /* from where it sent to */
        gdp_store16(out + ETH_TYPE_OFF, in->ipver == 4 ? ETH_P_IPV4 : ETH_P_IPV6);
    }
    return l2 + total;
}
