/* GENEVE tunnel endpoint engine (see engine.h): setup, the receive and transmit
 * loops, and the names of the counters. The work is in rx.c, encap.c, inject.c and
 * txq.c; no allocation anywhere: the caller hands in every buffer. */
#include "engine_int.h"

#include <errno.h>
#include <sched.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "csum.h"

/* How long a growing UDP run waits for the rest of its burst once the devices are
 * drained: a sender's burst reaches the device a datagram at a time, and a run cut
 * at every drain is a run of one or two. Only a run that already has two datagrams
 * waits, so a lone datagram (a request) leaves at once. */
#define USO_HOLD_NS 50000

size_t gdp_engine_size(void) { return sizeof(struct gdp_engine); }

size_t gdp_engine_buffers_size(void) { return (size_t)2 * GDP_BATCH * GDP_BUF_SIZE; }

uint16_t gdp_inet_csum(const uint8_t *buf, size_t len) { return inet_csum(buf, len); }

#define GDP_DROP_NAME_(name, lower, scope) #lower,
static const char *const drop_names[] = {GDP_DROP_REASONS(GDP_DROP_NAME_)};
#define GDP_DROP_SCOPE_(name, lower, scope) GDP_SCOPE_##scope,
#define GDP_SCOPE_SOCK 1
#define GDP_SCOPE_TUNNEL 0
static const unsigned char drop_on_socket[] = {GDP_DROP_REASONS(GDP_DROP_SCOPE_)};
#define GDP_COUNTER_NAME_(name) #name,
static const char *const counter_names[] = {GDP_TUNNEL_COUNTERS(GDP_COUNTER_NAME_)};
#define GDP_COUNTER_OFF_(name) offsetof(struct gdp_counters, name),
static const size_t counter_offsets[] = {GDP_TUNNEL_COUNTERS(GDP_COUNTER_OFF_)};

const char *gdp_drop_name(unsigned i) { return i < GDP_DROP_COUNT ? drop_names[i] : NULL; }

int gdp_drop_on_socket(unsigned i) { return i < GDP_DROP_COUNT ? drop_on_socket[i] : 0; }

const char *gdp_counter_name(unsigned i) {
    return i < GDP_COUNTER_COUNT ? counter_names[i] : NULL;
}

uint64_t gdp_counter_get(const struct gdp_counters *c, unsigned i) {
    uint64_t v = 0;
    if (i < GDP_COUNTER_COUNT)
        memcpy(&v, (const uint8_t *)c + counter_offsets[i], sizeof(v));
    return v;
}

int gdp_engine_init(struct gdp_engine *e, const struct gdp_engine_config *cfg,
                    struct gdp_tunnel *tunnels, uint32_t n, uint8_t *bufs,
                    size_t bufs_len, struct gdp_sock_stats *stats) {
    if (n == 0 || n > GDP_MAX_TUNNELS)
        return GDP_E_ENGINE_TOO_MANY;
    if (bufs_len < gdp_engine_buffers_size())
        return GDP_E_ENGINE_BUFFER;
    if (cfg->sport_min == 0 || cfg->sport_max < cfg->sport_min)
        return GDP_E_ENGINE_CONFIG;
    for (uint32_t i = 0; i < n; i++)
        if (tunnels[i].family != cfg->family || tunnels[i].hdr_len == 0)
            return GDP_E_ENGINE_CONFIG;
    memset(e, 0, sizeof(*e));
    e->cfg = *cfg;
    e->tunnels = tunnels;
    e->n = n;
    e->stats = stats;
    e->rx_bufs = bufs;
    e->tx_bufs = bufs + (size_t)GDP_BATCH * GDP_BUF_SIZE;
    e->ip_id = cfg->ip_id_start;
    e->rx_reset = GDP_BATCH;
    return 0;
}

/* Read what the ready devices have (by the revents of e->pfds) and encapsulate it. */
static void tx_read(struct gdp_engine *e, struct tx_state *st) {
    for (uint32_t k = 0; k < e->n; k++) {
        uint32_t idx = (e->rr + k) % e->n;
        struct pollfd *p = &e->pfds[1 + idx];
        if (!(p->revents & (POLLIN | POLLERR | POLLHUP)))
            continue;
        struct gdp_tunnel *t = &e->tunnels[idx];
        /* A bounded number of frames per device per round keeps tunnels fair. */
        for (int got = 0; got < GDP_BATCH * 2; got++) {
            if (st->bufs == GDP_BATCH) {
                uso_flush_all(e, st); /* runs point into the buffers tx_flush frees */
                tx_flush(e, st);
            }
            uint8_t *buf = e->tx_bufs + (size_t)st->bufs * GDP_BUF_SIZE;
            size_t vlen = t->vnet_hdr ? GDP_VNET_LEN : 0;
            ssize_t r = read(t->dev_fd, buf + GDP_HEADROOM - vlen, GDP_BUF_SIZE - GDP_HEADROOM + vlen);
            if (r < 0) {
                /* EBADFD: the device was deleted and this fd is dead for good. Poll
                 * would report it ready for ever (a busy loop), so stop polling it;
                 * the supervisor opens a new device. EAGAIN: drained. */
                if (errno == EBADFD)
                    p->fd = -1;
                break;
            }
            if ((size_t)r <= vlen)
                break;
            st->bufs++;
            st->done = 0;
            if (vlen)
                tx_vnet(e, st, idx, buf, (size_t)r - vlen);
            else
                tx_one(e, st, idx, buf, (size_t)r);
            if (st->done)
                st->bufs--; /* the next read lands in the same, cache-warm buffer */
        }
    }
}

/* Authenticated tunnels number what they send from the clock on (auth.h): the
 * counter is moved up to the time once per round, before anything is read. */
static void auth_tick(struct gdp_engine *e) {
    uint64_t now_seq = 0;
    for (uint32_t i = 0; i < e->n; i++) {
        struct gdp_auth *a = e->tunnels[i].auth;
        if (!a)
            continue;
        if (!now_seq)
            now_seq = gdp_auth_clock_seq();
        gdp_auth_tick(a, now_seq);
    }
}

/* One round: read, encapsulate, send in batches. */
static void tx_round(struct gdp_engine *e, struct tx_state *st) {
    auth_tick(e);
    tx_read(e, st);
    if (uso_growing(e) && st->bufs < GDP_BATCH) {
        struct timespec hold = {0, USO_HOLD_NS};
        if (ppoll(e->pfds + 1, e->n, &hold, NULL) > 0)
            tx_read(e, st);
    }
    e->rr++;
    uso_flush_all(e, st);
    tx_flush(e, st);
}

/* Kick the other direction into busy polling (its eventfd), at most once per window:
 * ``at`` is when this thread last did. */
static void kick(const struct gdp_engine *e, int fd, uint64_t *at) {
    uint64_t t = now_ns();
    if (fd < 0 || t - *at < e->cfg.busy_poll_ns)
        return;
    *at = t;
    uint64_t one = 1;
    ssize_t r = write(fd, &one, sizeof one);
    (void)r; /* a full counter is a kick already pending */
}

static void unkick(int fd) {
    uint64_t v;
    ssize_t r = read(fd, &v, sizeof v);
    (void)r;
}

/* Poll ``p[1..n)`` without sleeping for busy_poll_ns (p[0] is stop_fd), yielding the
 * CPU between polls to whatever else wants it; 1 once one of them is readable, 0 when
 * the window ran out, -1 when stopped. */
static int busy_poll(const struct gdp_engine *e, struct pollfd *p, nfds_t n) {
    uint64_t until = now_ns() + e->cfg.busy_poll_ns;
    do {
        if (poll(p, n, 0) > 0) {
            if (p[0].revents)
                return -1;
            return 1;
        }
        sched_yield();
    } while (now_ns() < until);
    return 0;
}

static int run_rx(struct gdp_engine *e) {
    struct pollfd p[3] = {{e->cfg.stop_fd, POLLIN, 0},
                          {e->cfg.udp_fd, POLLIN, 0},
                          {e->cfg.kick_rx_fd, POLLIN, 0}};
    nfds_t n = e->cfg.busy_poll_ns && e->cfg.kick_rx_fd >= 0 ? 3 : 2;
    int polling = 0;
    for (;;) {
        if (polling) {
            int r = busy_poll(e, p, 2);
            if (r < 0)
                return 0;
            polling = 0;
            if (r == 0)
                continue;
            e->stats->busy_poll_hits_rx++;
        } else {
            if (poll(p, n, -1) < 0) {
                if (errno == EINTR)
                    continue;
                return -errno;
            }
            if (p[0].revents)
                return 0;
            if (n == 3 && p[2].revents) {
                unkick(e->cfg.kick_rx_fd);
                polling = 1; /* after what is readable now */
            }
            if (!p[1].revents)
                continue;
        }
        uint64_t before = e->stats->rx_packets;
        int rc = rx_batch(e);
        if (rc < 0)
            return rc;
        /* Written to a device: a local program may answer through it. */
        if (n == 3 && e->stats->rx_packets != before)
            kick(e, e->cfg.kick_tx_fd, &e->rx_kicked_at);
    }
}

static int run_tx(struct gdp_engine *e) {
    struct tx_state st = {0, 0, 0};
    e->pfds[0].fd = e->cfg.stop_fd;
    e->pfds[0].events = POLLIN;
    for (uint32_t i = 0; i < e->n; i++) {
        e->pfds[1 + i].fd = e->tunnels[i].dev_fd;
        e->pfds[1 + i].events = POLLIN;
    }
    int busy = e->cfg.busy_poll_ns && e->cfg.kick_tx_fd >= 0;
    nfds_t n = e->n + 1 + (nfds_t)busy; /* the kick fd last */
    if (busy) {
        e->pfds[e->n + 1].fd = e->cfg.kick_tx_fd;
        e->pfds[e->n + 1].events = POLLIN;
    }
    int polling = 0;
    for (;;) {
        if (polling) {
            int r = busy_poll(e, e->pfds, e->n + 1);
            if (r < 0)
                return 0;
            polling = 0;
            if (r == 0)
                continue;
            e->stats->busy_poll_hits_tx++;
        } else {
            if (poll(e->pfds, n, -1) < 0) {
                if (errno == EINTR)
                    continue;
                return -errno;
            }
            if (e->pfds[0].revents)
                return 0;
            if (busy && e->pfds[e->n + 1].revents) {
                unkick(e->cfg.kick_tx_fd);
                polling = 1; /* after what is readable now */
            }
        }
        uint64_t before = 0;
        for (uint32_t i = 0; busy && i < e->n; i++)
            before += e->tunnels[i].counters.tx_packets;
        tx_round(e, &st);
        uint64_t after = 0;
        for (uint32_t i = 0; busy && i < e->n; i++)
            after += e->tunnels[i].counters.tx_packets;
        /* Sent to the remote: its answer comes back on the socket. */
        if (busy && after != before)
            kick(e, e->cfg.kick_rx_fd, &e->tx_kicked_at);
    }
}

int gdp_engine_run(struct gdp_engine *e, int dirs) {
    if (dirs == GDP_DIR_RX)
        return run_rx(e);
    if (dirs == GDP_DIR_TX)
        return run_tx(e);
    return GDP_E_ENGINE_CONFIG;
}
