/* Internet checksums (RFC 1071): one's complement sums, pseudo-header sums, the
 * partial-checksum convention of CHECKSUM_PARTIAL/virtio, and the RFC 1624
 * incremental update. Inline: they run per packet in every file. */
#ifndef GDP_CSUM_H
#define GDP_CSUM_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "proto.h"

/* One's complement sum of len bytes, added to sum (a big-endian-valued partial sum).
 * The bulk is summed as native 32-bit words (the one's complement sum of byte-swapped
 * words is the byte-swapped sum), folded, and swapped to the big-endian value; the odd
 * tail is added big-endian. Loads go through memcpy: no alignment needed. */
static inline uint64_t csum_partial(const uint8_t *p, size_t len, uint64_t sum) {
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

static inline uint16_t csum_fold(uint64_t sum) {
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (uint16_t)~sum;
}

static inline uint16_t inet_csum(const uint8_t *buf, size_t len) {
    return csum_fold(csum_partial(buf, len, 0));
}

/* A UDP checksum as sent: 0 means "none", so a computed 0 goes out as 0xFFFF. */
static inline uint16_t udp_csum_wire(uint16_t cs) { return cs ? cs : 0xFFFF; }

/* Recompute an IPv4 header checksum (options included). */
static inline void ip4_fix_csum(uint8_t *ip) {
    ip4_set_csum(ip, 0);
    ip4_set_csum(ip, inet_csum(ip, ip4_ihl(ip)));
}

/* The one's complement sum, unfolded, of the pseudo header of an upper-layer message
 * of ``len`` bytes between the addresses ``addrs`` (source then destination). */
static inline uint64_t pseudo_sum_addrs(const uint8_t *addrs, int ipver, uint8_t proto,
                                        size_t len) {
    return csum_partial(addrs, 2 * ip_alen(ipver), 0) + proto + (uint32_t)len;
}

/* The same, for a message in the IPv4 or IPv6 packet at ``ip`` (its addresses). */
static inline uint64_t pseudo_sum(const uint8_t *ip, int ipver, uint8_t proto, size_t len) {
    return pseudo_sum_addrs(ip_saddr(ip, ipver), ipver, proto, len);
}

/* Checksum of an upper-layer message with its pseudo header. */
static inline uint16_t l4_csum(const uint8_t *ip, int ipver, uint8_t proto, const uint8_t *msg,
                               size_t len) {
    return csum_fold(csum_partial(msg, len, pseudo_sum(ip, ipver, proto, len)));
}

/* Whether a TCP or UDP message checksums right (its checksum field included). */
static inline int l4_valid(const uint8_t *ip, int ipver, uint8_t proto, const uint8_t *msg,
                           size_t len) {
    return l4_csum(ip, ipver, proto, msg, len) == 0;
}

/* What a partial checksum field holds (CHECKSUM_PARTIAL, a virtio NEEDS_CSUM frame):
 * the pseudo-header sum, folded, not complemented. */
static inline uint16_t partial_field(const uint8_t *ip, int ipver, uint8_t proto, size_t len) {
    return (uint16_t)~csum_fold(pseudo_sum(ip, ipver, proto, len));
}

/* Whether the L4 checksum field holds just the pseudo-header sum over ``len`` bytes
 * (0 and 0xFFFF are the same one's complement sum). */
static inline int is_partial_field(const uint8_t *ip, int ipver, uint8_t proto, size_t len,
                                   uint16_t field) {
    uint16_t partial = partial_field(ip, ipver, proto, len);
    return field == partial ||
           ((field == 0 || field == 0xFFFF) && (partial == 0 || partial == 0xFFFF));
}

/* Complete a partial checksum: the field at msg + coff holds the pseudo-header sum,
 * and the sum of the message over it is the checksum. */
static inline void csum_complete(uint8_t *msg, size_t len, size_t coff) {
    gdp_store16(msg + coff, udp_csum_wire(inet_csum(msg, len)));
}

/* RFC 1624 eqn. 3: the checksum after a 16-bit word of the summed data changed. */
static inline uint16_t csum_update16(uint16_t check, uint16_t old, uint16_t new_) {
    uint32_t sum = (uint16_t)~check;
    sum += (uint16_t)~old;
    sum += new_;
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (uint16_t)~sum;
}

#endif
