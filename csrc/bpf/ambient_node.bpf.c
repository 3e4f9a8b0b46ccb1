/* Node side of the eBPF redirect mode (reference §8): frames move L2-to-L2 between the
 * ambient pods' host veths and the ztunnel pod's host veth with bpf_redirect; nothing
 * is tunnelled and no route, rule or iptables rule is involved.
 *
 *   app_outbound          ingress of an ambient pod's host veth (frames from the pod)
 *   app_inbound           egress of the same veth (frames to the pod)
 *   ztunnel_host_ingress  ingress of the ztunnel pod's host veth (frames from ztunnel)
 *
 * Every verdict is counted in node_stats by the name facts.NODE_COUNTERS gives it. */
#include "ambient.h"

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, GDP_APP_INFO_MAX);
    __type(key, __u32); /* pod IPv4, network order */
    __type(value, struct gdp_app_info);
} app_info SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct gdp_ztunnel_info);
} ztunnel_info SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u32); /* the node's IPv4, network order; 0: none */
} host_ip_info SEC(".maps");

GDP_STATS_MAP(node_stats, GDP_NODE_COUNT);

/* Rewrite the destination MAC, tag the frame for the next hop and send it out of
 * IFINDEX (into the peer namespace of that veth). */
static __always_inline int gdp_send(struct __sk_buff *skb, const __u8 *mac, __u32 ifindex,
                                    __u32 cb, __u32 counter)
{
    if (bpf_skb_store_bytes(skb, 0, mac, ETH_ALEN, 0) < 0) {
        GDP_COUNT(node_stats, GDP_NODE_malformed);
        return TC_ACT_SHOT;
    }
    skb->cb[4] = cb;
    GDP_COUNT(node_stats, counter);
    return bpf_redirect(ifindex, 0);
}

static __always_inline __u32 gdp_host_ip(void)
{
    __u32 zero = 0;
    __u32 *ip = bpf_map_lookup_elem(&host_ip_info, &zero);
    return ip ? *ip : 0;
}

SEC("tc")
int app_outbound(struct __sk_buff *skb)
{
    __u32 zero = 0;
    struct gdp_ztunnel_info *zt = bpf_map_lookup_elem(&ztunnel_info, &zero);
    struct gdp_pkt p;
    enum gdp_parse r;
    __u32 host;

    /* No ztunnel to send to: the pod is cut off rather than let out uncaptured. */
    if (!zt || !zt->ifindex) {
        GDP_COUNT(node_stats, GDP_NODE_out_drop_no_ztunnel);
        return TC_ACT_SHOT;
    }
    r = gdp_parse(skb, &p);
    if (r == GDP_NOT_IPV4) {
        GDP_COUNT(node_stats, GDP_NODE_out_pass_not_ipv4);
        return TC_ACT_OK;
    }
    if (r != GDP_IPV4) {
        GDP_COUNT(node_stats, GDP_NODE_malformed);
        return TC_ACT_OK;
    }
    host = gdp_host_ip();
    if (host && p.daddr == host) {
        GDP_COUNT(node_stats, GDP_NODE_out_pass_host_ip);
        return TC_ACT_OK;
    }
    if (p.proto != IPPROTO_TCP && p.proto != IPPROTO_UDP) {
        GDP_COUNT(node_stats, GDP_NODE_out_pass_other_proto);
        return TC_ACT_OK;
    }
    if (p.proto == IPPROTO_UDP && p.dport == bpf_htons(53) &&
        !(zt->flags & GDP_ZTUNNEL_FLAG_DNS_CAPTURE)) {
        GDP_COUNT(node_stats, GDP_NODE_out_pass_dns);
        return TC_ACT_OK;
    }
    return gdp_send(skb, zt->mac, zt->ifindex, GDP_CB_OUTBOUND, GDP_NODE_out_redirect);
}

SEC("tc")
int app_inbound(struct __sk_buff *skb)
{
    __u32 zero = 0;
    struct gdp_ztunnel_info *zt;
    struct gdp_pkt p;
    enum gdp_parse r;
    __u32 host;

    if (skb->cb[4] == GDP_CB_BYPASS) {
        GDP_COUNT(node_stats, GDP_NODE_in_pass_from_ztunnel);
        return TC_ACT_OK;
    }
    r = gdp_parse(skb, &p);
    if (r == GDP_NOT_IPV4) {
        GDP_COUNT(node_stats, GDP_NODE_in_pass_not_ipv4);
        return TC_ACT_OK;
    }
    if (r != GDP_IPV4) {
        GDP_COUNT(node_stats, GDP_NODE_malformed);
        return TC_ACT_OK;
    }
    host = gdp_host_ip();
    if (host && p.saddr == host) {
        GDP_COUNT(node_stats, GDP_NODE_in_pass_host_ip);
        return TC_ACT_OK;
    }
    if (p.proto != IPPROTO_TCP && p.proto != IPPROTO_UDP) {
        GDP_COUNT(node_stats, GDP_NODE_in_pass_other_proto);
        return TC_ACT_OK;
    }
    zt = bpf_map_lookup_elem(&ztunnel_info, &zero);
    if (!zt || !zt->ifindex) {
        GDP_COUNT(node_stats, GDP_NODE_in_drop_no_ztunnel);
        return TC_ACT_SHOT;
    }
    if (p.proto == IPPROTO_UDP && p.sport == bpf_htons(53)) {
        GDP_COUNT(node_stats, GDP_NODE_in_pass_dns);
        return TC_ACT_OK;
    }
    return gdp_send(skb, zt->mac, zt->ifindex, GDP_CB_INBOUND, GDP_NODE_in_redirect);
}

/* Besides its job, this program is the one always attached while the node is up, and
 * it uses every map: the maps live exactly as long as the node side, with no pin. */
SEC("tc")
int ztunnel_host_ingress(struct __sk_buff *skb)
{
    __u32 zero = 0;
    struct gdp_ztunnel_info *zt = bpf_map_lookup_elem(&ztunnel_info, &zero);
    struct gdp_app_info *pod;
    struct gdp_pkt p;
    __u32 host;

    /* Only the current ztunnel's veth sends to pods directly: a filter left on the
     * veth of a replaced ztunnel pod does nothing. */
    if (!zt || zt->ifindex != skb->ifindex) {
        GDP_COUNT(node_stats, GDP_NODE_zt_pass_not_current);
        return TC_ACT_OK;
    }
    if (gdp_parse(skb, &p) != GDP_IPV4 ||
        (p.proto != IPPROTO_TCP && p.proto != IPPROTO_UDP)) {
        GDP_COUNT(node_stats, GDP_NODE_zt_pass);
        return TC_ACT_OK;
    }
    host = gdp_host_ip();
    if (host && p.daddr == host) { /* the node is no pod: no lookup */
        GDP_COUNT(node_stats, GDP_NODE_zt_pass);
        return TC_ACT_OK;
    }
    pod = bpf_map_lookup_elem(&app_info, &p.daddr);
    if (!pod) {
        GDP_COUNT(node_stats, GDP_NODE_zt_pass);
        return TC_ACT_OK;
    }
    return gdp_send(skb, pod->mac, pod->ifindex, GDP_CB_BYPASS, GDP_NODE_zt_bypass);
}

char _license[] SEC("license") = "Dual BSD/GPL";
