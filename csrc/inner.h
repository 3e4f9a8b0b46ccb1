/* The inner frame: header parsing, flow hashing, flow keys and the reflected-options
 * table keyed by them. Pure but for the table, which the caller owns. */
#ifndef GDP_INNER_H
#define GDP_INNER_H

#include <stddef.h>
#include <stdint.h>

#include "engine.h"
#include "proto.h"

struct inner {
    int ipver;     /* 4, 6, or 0 for a non-IP frame */
    size_t ip_off; /* where the IP header starts in the frame */
    size_t ip_len; /* bytes from ip_off to the end of the frame */
    uint8_t ecn;
    uint8_t dsfield; /* the whole TOS / traffic class byte */
    uint8_t ttl;     /* TTL / hop limit */
    int df;
    uint8_t proto;
    int ports;
    uint16_t sport, dport;
};

/* Returns 0, or -1 when the frame cannot be a frame of this mode (TAP: shorter than
 * Ethernet; TUN: not IPv4 or IPv6 with a whole header). A TAP frame that claims IP but
 * is not one is carried as an opaque frame (ipver 0). */
int parse_inner(const uint8_t *f, size_t len, int mode, struct inner *in);

uint32_t hash_inner(const uint8_t *f, size_t len, const struct inner *in, uint32_t seed);

/* Where the L4 header of an IP packet with no IPv4 options and no IPv6 extension
 * headers starts, if the IP length covers exactly the rest of the frame (no link
 * padding); 0 for anything else. */
static inline size_t plain_l4(const uint8_t *f, const struct inner *in) {
    const uint8_t *ip = f + in->ip_off;
    if (in->ipver == 4)
        return ip[0] == 0x45 && ip4_tot_len(ip) == in->ip_len ? in->ip_off + IP4_HLEN : 0;
    return (size_t)ip6_plen(ip) + IP6_HLEN == in->ip_len ? in->ip_off + IP6_HLEN : 0;
}

/* Where the L4 header starts: after IPv4's options, or IPv6's fixed header. */
static inline size_t l4_off(const uint8_t *f, const struct inner *in) {
    return in->ip_off + (in->ipver == 4 ? ip4_ihl(f + in->ip_off) : IP6_HLEN);
}

/* Remember the GENEVE options a flow arrived with (reflect_options); the reverse
 * flow's packets carry them back. Safe with several writers and readers. */
void reflect_store(struct gdp_tunnel *t, const uint8_t *f, const struct inner *in,
                   const uint8_t *opts, size_t opts_len);
/* Copies the options remembered for the reverse flow into out; returns their length
 * or 0. */
size_t reflect_lookup(struct gdp_tunnel *t, const uint8_t *f, const struct inner *in,
                      uint8_t *out);

#endif
