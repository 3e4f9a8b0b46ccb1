/* Shared by the node and ztunnel programs of the eBPF redirect mode: map value layouts
 * (the Python loader packs the same ones, geneve_dp/ambient/ebpf/maps.py) and the
 * bounded header parse. The constants come from gdp_bpf_facts.h, which the build
 * renders from geneve_dp/ambient/ebpf/facts.py and ambient/constants.py. */
#ifndef GDP_BPF_AMBIENT_H
#define GDP_BPF_AMBIENT_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "gdp_bpf_facts.h"

/* app_info value: where an ambient pod is, seen from the node. */
struct gdp_app_info {
    __u32 ifindex; /* the pod's host-side veth */
    __u8 mac[ETH_ALEN]; /* the pod's eth0 */
    __u8 pad[2];
};

/* ztunnel_info[0]: where the ztunnel pod is. ifindex 0: not known (yet). */
struct gdp_ztunnel_info {
    __u32 ifindex; /* the ztunnel pod's host-side veth */
    __u8 mac[ETH_ALEN]; /* its eth0 */
    __u8 flags; /* GDP_ZTUNNEL_FLAG_DNS_CAPTURE */
    __u8 pad;
};

/* What the programs decide on, all in network byte order. */
struct gdp_pkt {
    __u32 saddr;
    __u32 daddr;
    __u16 sport; /* 0 unless TCP/UDP and not a later fragment */
    __u16 dport;
    __u8 proto;
};

enum gdp_parse { GDP_IPV4 = 0, GDP_NOT_IPV4 = 1, GDP_MALFORMED = 2 };

/* Reads through bpf_skb_load_bytes: correct whether or not the headers sit in the
 * linear part of the skb, and every read is bounded by the helper. */
static __always_inline enum gdp_parse gdp_parse(struct __sk_buff *skb, struct gdp_pkt *p)
{
    struct iphdr ip;
    __u16 ports[2];
    __u32 off;

    if (skb->protocol != bpf_htons(ETH_P_IP))
        return GDP_NOT_IPV4;
    if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
        return GDP_MALFORMED;
    if (ip.version != 4 || ip.ihl < 5)
        return GDP_MALFORMED;
    p->saddr = ip.saddr;
    p->daddr = ip.daddr;
    p->proto = ip.protocol;
    p->sport = 0;
    p->dport = 0;
    if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP)
        return GDP_IPV4;
    if (ip.frag_off & bpf_htons(0x1fff)) /* a later fragment has no ports */
        return GDP_IPV4;
    off = ETH_HLEN + (ip.ihl & 0xf) * 4;
    if (bpf_skb_load_bytes(skb, off, ports, sizeof(ports)) < 0)
        return GDP_MALFORMED;
    p->sport = ports[0];
    p->dport = ports[1];
    return GDP_IPV4;
}

/* Per-CPU counter array named MAP with N slots; COUNT(MAP, i) adds one. */
#define GDP_STATS_MAP(name, n)                      \
    struct {                                        \
        __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);    \
        __uint(max_entries, n);                     \
        __type(key, __u32);                         \
        __type(value, __u64);                       \
    } name SEC(".maps")

#define GDP_COUNT(map, idx)                                 \
    do {                                                    \
        __u32 gdp_k = (idx);                                \
        __u64 *gdp_c = bpf_map_lookup_elem(&(map), &gdp_k); \
        if (gdp_c)                                          \
            *gdp_c += 1;                                    \
    } while (0)

#endif
