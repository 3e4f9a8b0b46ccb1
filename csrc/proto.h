/* Wire constants and accessors for the headers the engine reads and writes:
 * Ethernet, IPv4, IPv6, UDP, TCP and the virtio-net header. Each offset into a
 * header is named here once; the rest of the engine goes through these. */
#ifndef GDP_PROTO_H
#define GDP_PROTO_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "bytes.h"

/* ---- Ethernet */
#define ETH_HLEN 14
#define ETH_VLAN_HLEN 18
#define ETH_ALEN 6
#define ETH_DST_OFF 0
#define ETH_SRC_OFF 6
#define ETH_TYPE_OFF 12
#define ETH_P_IPV4 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_P_VLAN 0x8100
#define ETH_P_TEB 0x6558

/* ---- IP (both versions) */
#define IPPROTO_ICMP_ 1
#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17
#define IPPROTO_ICMPV6_ 58
#define IPPROTO_FRAG6_ 44
#define IP4_HLEN 20
#define IP6_HLEN 40
#define IP6_FRAG_HLEN 8
#define IP_DF 0x4000
#define IP_MF 0x2000
#define IP_OFFMASK 0x1FFF
#define ECN_MASK 0x03
#define ECN_CE 0x03
#define ECN_ECT0 0x02

static inline int ip_version(const uint8_t *ip) { return ip[0] >> 4; }
/* The fixed header of a version: what the engine writes (no IPv4 options). */
static inline size_t ip_base_hlen(int ipver) { return ipver == 4 ? IP4_HLEN : IP6_HLEN; }
static inline size_t ip_alen(int ipver) { return ipver == 4 ? 4 : 16; }
/* Source then destination address, adjacent in both versions. */
static inline const uint8_t *ip_saddr(const uint8_t *ip, int ipver) {
    return ipver == 4 ? ip + 12 : ip + 8;
}
static inline const uint8_t *ip_daddr(const uint8_t *ip, int ipver) {
    return ipver == 4 ? ip + 16 : ip + 24;
}

/* IPv4 */
static inline size_t ip4_ihl(const uint8_t *ip) { return (size_t)(ip[0] & 0x0F) * 4; }
static inline uint16_t ip4_tot_len(const uint8_t *ip) { return gdp_load16(ip + 2); }
static inline void ip4_set_tot_len(uint8_t *ip, size_t v) { gdp_store16(ip + 2, (uint16_t)v); }
static inline uint16_t ip4_id(const uint8_t *ip) { return gdp_load16(ip + 4); }
static inline void ip4_set_id(uint8_t *ip, uint16_t v) { gdp_store16(ip + 4, v); }
static inline uint16_t ip4_frag(const uint8_t *ip) { return gdp_load16(ip + 6); }
static inline void ip4_set_frag(uint8_t *ip, uint16_t v) { gdp_store16(ip + 6, v); }
#define IP4_TOS_OFF 1
#define IP4_TTL_OFF 8
#define IP4_PROTO_OFF 9
#define IP4_CSUM_OFF 10
static inline uint16_t ip4_csum(const uint8_t *ip) { return gdp_load16(ip + IP4_CSUM_OFF); }
static inline void ip4_set_csum(uint8_t *ip, uint16_t v) { gdp_store16(ip + IP4_CSUM_OFF, v); }

/* IPv6 */
static inline uint16_t ip6_plen(const uint8_t *ip) { return gdp_load16(ip + 4); }
static inline void ip6_set_plen(uint8_t *ip, size_t v) { gdp_store16(ip + 4, (uint16_t)v); }
#define IP6_NEXT_OFF 6
#define IP6_HOP_OFF 7
static inline uint8_t ip6_tclass(const uint8_t *ip) { return (uint8_t)(gdp_load16(ip) >> 4); }

/* The upper-layer protocol (IPv6: the first next header). */
static inline uint8_t ip_proto(const uint8_t *ip, int ipver) {
    return ipver == 4 ? ip[IP4_PROTO_OFF] : ip[IP6_NEXT_OFF];
}
/* The length the IP header gives its packet. */
static inline size_t ip_total(const uint8_t *ip, int ipver) {
    return ipver == 4 ? ip4_tot_len(ip) : IP6_HLEN + (size_t)ip6_plen(ip);
}
/* Two IP headers that differ only where merging or splitting rewrites them: IPv4
 * length, ID and checksum, IPv6 payload length. */
static inline int same_ip(const uint8_t *a, const uint8_t *b, int ipver) {
    return ipver == 4 ? !memcmp(a, b, 2) && !memcmp(a + 6, b + 6, 4) && !memcmp(a + 12, b + 12, 8)
                      : !memcmp(a, b, 4) && !memcmp(a + 6, b + 6, 34);
}

/* ---- UDP */
#define UDP_HLEN 8
#define UDP_LEN_OFF 4
#define UDP_CSUM_OFF 6
static inline uint16_t udp_len(const uint8_t *u) { return gdp_load16(u + UDP_LEN_OFF); }
static inline uint16_t udp_csum(const uint8_t *u) { return gdp_load16(u + UDP_CSUM_OFF); }

/* ---- TCP */
#define TCP_HLEN 20
#define TCP_SEQ_OFF 4
#define TCP_FLAGS_OFF 13
#define TCP_CSUM_OFF 16
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_PSH 0x08
#define TCP_ACK 0x10
#define TCP_URG 0x20
#define TCP_ECE 0x40
#define TCP_CWR 0x80
static inline size_t tcp_doff(const uint8_t *tcp) { return (size_t)(tcp[12] >> 4) * 4; }
static inline uint32_t tcp_seq(const uint8_t *tcp) { return gdp_load32(tcp + TCP_SEQ_OFF); }

/* ---- ICMP */
#define ICMP_HLEN 8
#define ICMP_DEST_UNREACH 3
#define ICMP_FRAG_NEEDED 4
#define ICMPV6_PKT_TOOBIG 2

/* ---- virtio-net header (struct virtio_net_hdr_v1, little-endian fields) */
#define VNET_F_NEEDS_CSUM 1
#define VNET_GSO_NONE 0
#define VNET_GSO_TCPV4 1
#define VNET_GSO_TCPV6 4
#define VNET_GSO_UDP_L4 5
#define VNET_GSO_ECN 0x80
#define VNET_GSO_UDP_TUNNEL_IPV4 0x20
/* The inject device's header: struct virtio_net_hdr_v1_hash_tunnel. */
#define VNET_TUNNEL_LEN 24
#define VNET_OUTER_TH_OFF 20
#define VNET_INNER_NH_OFF 22

struct vnet_hdr {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
};

static inline uint16_t load16le(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

static inline void store16le(uint8_t *p, size_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static inline struct vnet_hdr vnet_get(const uint8_t *p) {
    struct vnet_hdr v = {p[0], p[1], load16le(p + 2), load16le(p + 4), load16le(p + 6),
                         load16le(p + 8)};
    return v;
}

/* Writes the first 10 bytes (the fields of struct vnet_hdr); the caller zeroes the rest. */
static inline void vnet_put(uint8_t *p, const struct vnet_hdr *v) {
    p[0] = v->flags;
    p[1] = v->gso_type;
    store16le(p + 2, v->hdr_len);
    store16le(p + 4, v->gso_size);
    store16le(p + 6, v->csum_start);
    store16le(p + 8, v->csum_offset);
}

#endif
