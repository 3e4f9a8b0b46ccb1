/* ztunnel side of the eBPF redirect mode (reference §8), on ingress of the ztunnel
 * pod's eth0. Frames the node programs redirected here carry skb->cb[4] = OUTBOUND or
 * INBOUND; their IP destination is not ours, so the kernel would forward them.
 *
 *   ztunnel_tproxy  hands TCP to the socket that must take it, in the kernel:
 *                   the connection's own socket if there is one, else the listener
 *                   (15001 outbound; 15008 for inbound to port 15008, else 15006),
 *                   with bpf_sk_assign, and sets mark 0x400 so that ip rule 20000
 *                   routes it to table 100 (local delivery).
 *   ztunnel_mark    where bpf_sk_assign is missing: marks new connections
 *                   EBPF_OUTBOUND/INBOUND_MARK for iptables TPROXY and leaves
 *                   packets of existing connections unmarked (mark 0x4d3 rule).
 *
 * Verdicts are counted in ztunnel_stats (facts.ZTUNNEL_COUNTERS). */
#include "ambient.h"

GDP_STATS_MAP(ztunnel_stats, GDP_ZT_COUNT);

/* 0: a redirected TCP packet, tuple filled; else the counter of why not. */
static __always_inline int gdp_redirected_tcp(struct __sk_buff *skb, struct gdp_pkt *p,
                                              struct bpf_sock_tuple *t)
{
    __u32 cb = skb->cb[4];
    enum gdp_parse r;

    if (cb != GDP_CB_OUTBOUND && cb != GDP_CB_INBOUND)
        return GDP_ZT_tp_pass_not_redirected;
    r = gdp_parse(skb, p);
    if (r == GDP_MALFORMED)
        return GDP_ZT_malformed;
    if (r != GDP_IPV4 || p->proto != IPPROTO_TCP || !p->dport)
        return GDP_ZT_tp_pass_not_tcp;
    t->ipv4.saddr = p->saddr;
    t->ipv4.daddr = p->daddr;
    t->ipv4.sport = p->sport;
    t->ipv4.dport = p->dport;
    return 0;
}

SEC("tc")
int ztunnel_tproxy(struct __sk_buff *skb)
{
    struct bpf_sock_tuple t = {};
    struct bpf_sock *sk;
    struct gdp_pkt p;
    __u32 counter;
    __u16 port;
    long err;
    int why = gdp_redirected_tcp(skb, &p, &t);

    if (why) {
        GDP_COUNT(ztunnel_stats, why);
        return TC_ACT_OK;
    }
    sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (sk) {
        if (sk->state != BPF_TCP_LISTEN) {
            counter = GDP_ZT_tp_established;
            goto assign;
        }
        bpf_sk_release(sk);
    }
    if (skb->cb[4] == GDP_CB_OUTBOUND) {
        port = GDP_PORT_OUTBOUND;
        counter = GDP_ZT_tp_listener_outbound;
    } else if (p.dport == bpf_htons(GDP_PORT_INBOUND)) {
        port = GDP_PORT_INBOUND;
        counter = GDP_ZT_tp_listener_inbound;
    } else {
        port = GDP_PORT_INBOUND_PLAINTEXT;
        counter = GDP_ZT_tp_listener_plaintext;
    }
    /* The listener as TPROXY --on-ip 127.0.0.1 --on-port PORT finds it: a wildcard
     * listener matches; no established socket has this tuple. */
    t.ipv4.daddr = bpf_htonl(0x7f000001);
    t.ipv4.dport = bpf_htons(port);
    sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (!sk) {
        GDP_COUNT(ztunnel_stats, GDP_ZT_tp_drop_no_listener);
        return TC_ACT_SHOT;
    }
    if (sk->state != BPF_TCP_LISTEN) {
        bpf_sk_release(sk);
        GDP_COUNT(ztunnel_stats, GDP_ZT_tp_drop_no_listener);
        return TC_ACT_SHOT;
    }
assign:
    err = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    if (err) {
        GDP_COUNT(ztunnel_stats, GDP_ZT_tp_drop_assign_failed);
        return TC_ACT_SHOT;
    }
    skb->mark = GDP_TPROXY_MARK;
    GDP_COUNT(ztunnel_stats, counter);
    return TC_ACT_OK;
}

SEC("tc")
int ztunnel_mark(struct __sk_buff *skb)
{
    struct bpf_sock_tuple t = {};
    struct bpf_sock *sk;
    struct gdp_pkt p;
    int why = gdp_redirected_tcp(skb, &p, &t);

    if (why) {
        GDP_COUNT(ztunnel_stats, why);
        return TC_ACT_OK;
    }
    sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (sk) {
        __u32 state = sk->state;

        bpf_sk_release(sk);
        if (state != BPF_TCP_LISTEN) {
            GDP_COUNT(ztunnel_stats, GDP_ZT_mk_established);
            return TC_ACT_OK;
        }
    }
    if (skb->cb[4] == GDP_CB_OUTBOUND) {
        skb->mark = GDP_EBPF_OUTBOUND_MARK;
        GDP_COUNT(ztunnel_stats, GDP_ZT_mk_outbound);
    } else {
        skb->mark = GDP_EBPF_INBOUND_MARK;
        GDP_COUNT(ztunnel_stats, GDP_ZT_mk_inbound);
    }
    return TC_ACT_OK;
}

char _license[] SEC("license") = "Dual BSD/GPL";
