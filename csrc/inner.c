/* Inner frame parsing, flow hashing and the reflected-options table (inner.h). */
#include "inner.h"

#include <string.h>

int parse_inner(const uint8_t *f, size_t len, int mode, struct inner *in) {
    memset(in, 0, sizeof(*in));
    size_t off = 0;
    int ver;
    if (mode == GDP_MODE_TAP) {
        if (len < ETH_HLEN)
            return -1;
        uint16_t type = gdp_load16(f + ETH_TYPE_OFF);
        off = ETH_HLEN;
        if (type == ETH_P_VLAN) {
            if (len < ETH_VLAN_HLEN)
                return 0;
            type = gdp_load16(f + ETH_HLEN + 2);
            off = ETH_VLAN_HLEN;
        }
        if (type == ETH_P_IPV4)
            ver = 4;
        else if (type == ETH_P_IPV6)
            ver = 6;
        else
            return 0;
        if (len <= off || ip_version(f + off) != ver)
            return 0; /* claims IP but is not: carried as an opaque frame */
    } else {
        if (len < 1)
            return -1;
        ver = ip_version(f);
        if (ver != 4 && ver != 6)
            return -1;
    }
    const uint8_t *ip = f + off;
    size_t left = len - off;
    size_t l4 = 0;
    if (ver == 4) {
        if (left < IP4_HLEN)
            return mode == GDP_MODE_TAP ? 0 : -1;
        size_t ihl = ip4_ihl(ip);
        if (ihl < IP4_HLEN || ihl > left)
            return mode == GDP_MODE_TAP ? 0 : -1;
        uint16_t frag = ip4_frag(ip);
        in->dsfield = ip[IP4_TOS_OFF];
        in->ecn = in->dsfield & ECN_MASK;
        in->ttl = ip[IP4_TTL_OFF];
        in->df = (frag & IP_DF) != 0;
        in->proto = ip[IP4_PROTO_OFF];
        if ((frag & (IP_MF | IP_OFFMASK)) == 0)
            l4 = ihl;
    } else {
        if (left < IP6_HLEN)
            return mode == GDP_MODE_TAP ? 0 : -1;
        in->dsfield = ip6_tclass(ip);
        in->ecn = in->dsfield & ECN_MASK;
        in->ttl = ip[IP6_HOP_OFF];
        in->proto = ip[IP6_NEXT_OFF];
        l4 = IP6_HLEN;
    }
    in->ipver = ver;
    in->ip_off = off;
    in->ip_len = left;
    /* TCP, UDP, SCTP and UDP-Lite start with the two ports. */
    if (l4 && (in->proto == 6 || in->proto == 17 || in->proto == 132 || in->proto == 136) &&
        left >= l4 + 4) {
        in->ports = 1;
        in->sport = gdp_load16(ip + l4);
        in->dport = gdp_load16(ip + l4 + 2);
    }
    return 0;
}

/* FNV-1a over the flow's fields, then a murmur3 finalizer. */
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

uint32_t hash_inner(const uint8_t *f, size_t len, const struct inner *in, uint32_t seed) {
    uint32_t h = 2166136261u ^ seed;
    if (in->ipver) {
        const uint8_t *ip = f + in->ip_off;
        h = mix(h, ip_saddr(ip, in->ipver), 2 * ip_alen(in->ipver)); /* source, destination */
        h = mix(h, &in->proto, 1);
        if (in->ports) {
            uint8_t ports[4];
            gdp_store16(ports, in->sport);
            gdp_store16(ports + 2, in->dport);
            h = mix(h, ports, 4);
        }
    } else if (len >= ETH_HLEN) {
        h = mix(h, f, ETH_HLEN); /* non-IP Ethernet: addresses and type */
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
    size_t alen = ip_alen(in->ipver);
    uint8_t a[18], b[18];
    memcpy(a, ip_saddr(ip, in->ipver), alen);
    memcpy(b, ip_daddr(ip, in->ipver), alen);
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

void reflect_store(struct gdp_tunnel *t, const uint8_t *f, const struct inner *in,
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

size_t reflect_lookup(struct gdp_tunnel *t, const uint8_t *f, const struct inner *in,
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
