/* The transmit queue: outer datagrams queued in slots and sent with one sendmmsg per
 * run of slots bound for the same socket, or a UDP GSO super-datagram with one
 * sendmsg. Every send goes through send_again, the one errno policy. */
#include "engine_int.h"

#include <errno.h>
#include <string.h>

#define UDP_SEGMENT_OPT 103 /* linux/udp.h UDP_SEGMENT */
#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#define SEND_WAITS 10   /* waits for room (or ICMP errors cleared) per send call */
#define SEND_WAIT_MS 10 /* each */

/* Whether a failed send is tried again: EINTR always; a full send buffer (EAGAIN,
 * ENOBUFS) after waiting for room; an ICMP error reported on a connected socket
 * (ECONNREFUSED) at once, since reporting it cleared it. At most SEND_WAITS of the
 * last two per call; anything else drops the datagram. */
static int send_again(int fd, int connected, int *waits) {
    if (errno == EINTR)
        return 1;
    if (*waits >= SEND_WAITS)
        return 0;
    if (errno == EAGAIN || errno == ENOBUFS) {
        struct pollfd p = {fd, POLLOUT, 0};
        poll(&p, 1, SEND_WAIT_MS);
        ++*waits;
        return 1;
    }
    if (errno == ECONNREFUSED && connected) {
        ++*waits;
        return 1;
    }
    return 0;
}

static void gso_batch_flush(struct gdp_engine *e) {
    uint32_t n = e->gb.n;
    if (!n)
        return;
    e->gb.n = 0;
    gso_send(e, &e->tunnels[e->gb.idx], e->gb.hash, e->gb.tos, n, e->gb.size);
}

void tx_send(struct gdp_engine *e, struct tx_state *st) {
    gso_batch_flush(e); /* empty whenever slots are queued: this keeps the order */
    int done = 0;
    int waits = 0;
    while (done < st->slots) {
        /* One sendmmsg per run of slots bound for the same socket. */
        int fd = e->tx_fd[done];
        int end = done + 1;
        while (end < st->slots && e->tx_fd[end] == fd)
            end++;
        int r = sendmmsg(fd, e->tx_msgs + done, (unsigned)(end - done), 0);
        if (r > 0) {
            for (int i = done; i < done + r; i++)
                if (e->tx_last[i]) {
                    struct gdp_counters *c = &e->tunnels[e->tx_tunnel[i]].counters;
                    c->tx_packets++;
                    c->tx_bytes += e->tx_inner_len[i];
                }
            done += r;
            continue;
        }
        /* Only raw-socket slots name their destination; the UDP sockets are connected. */
        if (send_again(fd, e->tx_msgs[done].msg_hdr.msg_name == NULL, &waits))
            continue;
        /* This datagram failed: drop its whole packet, count it once. */
        e->tunnels[e->tx_tunnel[done]].counters.drops[GDP_DROP_TX_ERROR]++;
        while (done < st->slots && !e->tx_last[done])
            done++;
        done++;
    }
    st->slots = 0;
}

void tx_flush(struct gdp_engine *e, struct tx_state *st) {
    tx_send(e, st);
    st->bufs = 0;
}

/* The next free slot, sending what is queued when all are taken. */
static int take_slot(struct gdp_engine *e, struct tx_state *st) {
    gso_batch_flush(e); /* what was queued before this datagram leaves before it */
    if (st->slots >= TX_SLOTS)
        tx_send(e, st);
    return st->slots++;
}

void add_slot(struct gdp_engine *e, struct tx_state *st, uint32_t idx, uint8_t *h, size_t hlen,
              uint8_t *d, size_t dlen, uint32_t inner_len, int last) {
    struct gdp_tunnel *t = &e->tunnels[idx];
    int s = take_slot(e, st);
    struct sockaddr_in6 *a = &e->tx_addr[s];
    memset(a, 0, sizeof(*a));
    socklen_t alen;
    if (t->family == 4) {
        struct sockaddr_in *a4 = (struct sockaddr_in *)a;
        a4->sin_family = AF_INET;
        memcpy(&a4->sin_addr, t->remote, 4);
        alen = sizeof(*a4);
    } else {
        a->sin6_family = AF_INET6;
        memcpy(&a->sin6_addr, t->remote, 16);
        alen = sizeof(*a);
    }
    e->tx_iov[s][0].iov_base = h;
    e->tx_iov[s][0].iov_len = hlen;
    e->tx_iov[s][1].iov_base = d;
    e->tx_iov[s][1].iov_len = dlen;
    struct msghdr *m = &e->tx_msgs[s].msg_hdr;
    memset(m, 0, sizeof(*m));
    m->msg_name = a;
    m->msg_namelen = alen;
    m->msg_iov = e->tx_iov[s];
    m->msg_iovlen = dlen ? 2 : 1;
    e->tx_fd[s] = t->raw_fd > 0 ? t->raw_fd : e->cfg.raw_fd;
    e->tx_tunnel[s] = idx;
    e->tx_inner_len[s] = last ? inner_len : 0;
    e->tx_last[s] = (uint8_t)last;
}

/* An IP-level cmsg for the outer TOS into buf (an IP_TOS/IPV6_TCLASS int). */
static struct cmsghdr *put_tos_cmsg(struct cmsghdr *cm, int family, uint8_t tos) {
    cm->cmsg_level = family == 4 ? IPPROTO_IP : IPPROTO_IPV6;
    cm->cmsg_type = family == 4 ? IP_TOS : IPV6_TCLASS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    int v = tos;
    memcpy(CMSG_DATA(cm), &v, sizeof(v));
    return cm;
}

void add_udp_slot(struct gdp_engine *e, struct tx_state *st, uint32_t idx, uint32_t hash,
                  uint8_t tos, uint8_t *g, size_t glen, uint8_t *rest, size_t rest_len,
                  uint32_t inner_len) {
    struct gdp_tunnel *t = &e->tunnels[idx];
    int s = take_slot(e, st);
    e->tx_iov[s][0].iov_base = g;
    e->tx_iov[s][0].iov_len = glen;
    e->tx_iov[s][1].iov_base = rest;
    e->tx_iov[s][1].iov_len = rest_len;
    struct msghdr *m = &e->tx_msgs[s].msg_hdr;
    memset(m, 0, sizeof(*m));
    m->msg_iov = e->tx_iov[s];
    m->msg_iovlen = rest_len ? 2 : 1;
    /* An IP-level cmsg costs a route lookup: only when ECN bits make the TOS differ
     * from the one set on the socket. */
    if (tos != socket_tos(t)) {
        memset(e->tx_cmsg[s], 0, sizeof(e->tx_cmsg[s]));
        m->msg_control = e->tx_cmsg[s];
        m->msg_controllen = sizeof(e->tx_cmsg[s]);
        put_tos_cmsg(CMSG_FIRSTHDR(m), t->family, tos);
    }
    e->tx_fd[s] = flow_fd(t, hash);
    e->tx_tunnel[s] = idx;
    e->tx_inner_len[s] = inner_len;
    e->tx_last[s] = 1;
}

void gso_send(struct gdp_engine *e, struct gdp_tunnel *t, uint32_t hash, uint8_t tos,
              size_t nseg, size_t seg_size) {
    int fd = flow_fd(t, hash);
    union {
        uint8_t buf[CMSG_SPACE(sizeof(uint16_t)) + CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } ctl;
    memset(&ctl, 0, sizeof(ctl));
    struct msghdr m = {.msg_iov = e->gso_iov, .msg_iovlen = 2 * nseg};
    m.msg_control = ctl.buf;
    m.msg_controllen = sizeof(ctl.buf);
    struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
    cm->cmsg_level = SOL_UDP;
    cm->cmsg_type = UDP_SEGMENT_OPT;
    cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
    uint16_t gs = (uint16_t)seg_size;
    memcpy(CMSG_DATA(cm), &gs, sizeof(gs));
    /* Any IP-level cmsg makes the kernel route the send afresh instead of using the
     * connected socket's cached route: the TOS goes along only when it differs from
     * the one set on the socket (no inner ECN bits). */
    if (tos == socket_tos(t))
        m.msg_controllen = CMSG_SPACE(sizeof(uint16_t));
    else
        put_tos_cmsg(CMSG_NXTHDR(&m, cm), t->family, tos);
    struct gdp_counters *c = &t->counters;
    int waits = 0;
    ssize_t r;
    while ((r = sendmsg(fd, &m, 0)) < 0 && send_again(fd, 1, &waits))
        ;
    if (r < 0) {
        c->drops[GDP_DROP_TX_ERROR] += nseg;
        return;
    }
    c->tx_packets += nseg;
    for (size_t i = 0; i < nseg; i++)
        c->tx_bytes += e->gso_inner[i];
}

void gso_batch_add(struct gdp_engine *e, struct tx_state *st, uint32_t idx, uint32_t hash,
                   uint8_t tos, uint8_t *g, size_t glen, uint32_t inner_len) {
    struct gdp_tunnel *t = &e->tunnels[idx];
    if (e->gb.n &&
        (e->gb.idx != idx || flow_fd(t, hash) != flow_fd(&e->tunnels[e->gb.idx], e->gb.hash) ||
         e->gb.tos != tos || glen > e->gb.size || e->gb.closed || e->gb.n == GSO_MAX_SEGS ||
         e->gb.bytes + glen > GSO_MAX_BYTES))
        gso_batch_flush(e);
    if (st->slots)
        tx_send(e, st); /* the slots queued before this packet (the batch is empty) */
    uint32_t n = e->gb.n;
    if (!n) {
        e->gb.idx = idx;
        e->gb.hash = hash;
        e->gb.tos = tos;
        e->gb.size = (uint32_t)glen;
        e->gb.bytes = 0;
        e->gb.closed = 0;
    } else if (glen < e->gb.size) {
        e->gb.closed = 1; /* a shorter datagram can only be the last */
    }
    e->gso_iov[2 * n].iov_base = g;
    e->gso_iov[2 * n].iov_len = glen;
    e->gso_iov[2 * n + 1].iov_base = g;
    e->gso_iov[2 * n + 1].iov_len = 0;
    e->gso_inner[n] = inner_len;
    e->gb.bytes += (uint32_t)glen;
    e->gb.n = n + 1;
}
