/* GENEVE tunnel endpoint engine: batched forwarding between TAP/TUN devices and the
 * underlay.
 *
 * Receive: recvmmsg on the port's UDP socket (with UDP GRO where the kernel has it),
 * the kernel geneve checks, then a write to the tunnel's device (received segments of
 * one flow coalesced into one super-frame on devices with a virtio header).
 * Transmit, per packet, the first of these that applies:
 * - the inject device (a TAP with UDP tunnel GSO): TSO super-frames and runs of UDP
 *   datagrams, written whole behind their outer headers, forwarded by the kernel;
 * - the tunnel's connected UDP sockets, picked by flow hash: TSO segments as one UDP
 *   GSO send, or packets one datagram each where the outer checksum is off;
 * - the raw IP socket (header inclusion): outer headers written here, for outer
 *   fragments and for tunnels without connected sockets.
 *
 * Python (geneve_dp/dataplane/engine_c.py) opens every fd, fills struct gdp_tunnel
 * and allocates all memory; C only moves packets and counts. One engine serves one
 * receive socket (one family and port) and the tunnels demultiplexed from it. */
#ifndef GDP_ENGINE_H
#define GDP_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "counters.h"
#include "geneve.h"

/* Room in front of an inner frame for outer IPv6 (40) + fragment header (8) +
 * UDP (8) + the largest GENEVE header (260), rounded up. */
#define GDP_HEADROOM 320
#define GDP_FRAME_MAX 65535
/* A TSO super-frame (IFF_VNET_HDR) can exceed 64 KiB by its link header. */
#define GDP_BUF_SIZE (GDP_HEADROOM + GDP_FRAME_MAX + 1 + 512)
#define GDP_VNET_LEN 12 /* struct virtio_net_hdr_v1, set with TUNSETVNETHDRSZ */
#define GDP_BATCH 32
#define GDP_MAX_TUNNELS 255
#define GDP_OPTSEEN_SLOTS 32
#define GDP_REFLECT_KEY_LEN 37

#define GDP_MODE_TAP 0
#define GDP_MODE_TUN 1
#define GDP_DF_UNSET 0
#define GDP_DF_SET 1
#define GDP_DF_INHERIT 2
#define GDP_TOS_UNSET 0
#define GDP_TOS_FIXED 1
#define GDP_TOS_INHERIT 2
/* The TTL a frame that is not IP gets under ttl inherit (the kernel's IPDEFTTL). */
#define GDP_DEFAULT_TTL 64

/* What one gdp_engine_run call forwards: one thread per direction. */
#define GDP_DIR_RX 1
#define GDP_DIR_TX 2

struct gdp_optseen {
    uint16_t opt_class;
    uint8_t type;
    uint8_t used;
    uint64_t count;
};

#define GDP_COUNTER_FIELD_(name) uint64_t name;
struct gdp_counters {
    GDP_TUNNEL_COUNTERS(GDP_COUNTER_FIELD_) /* counters.h */
    uint64_t drops[GDP_DROP_COUNT];
    uint64_t options_other; /* options seen after the table below filled up */
    struct gdp_optseen options_seen[GDP_OPTSEEN_SLOTS];
};
#undef GDP_COUNTER_FIELD_

/* One remembered flow for reflect_options. ``seq`` is a seqlock: the receive thread
 * writes, the transmit thread reads. */
struct gdp_reflect_entry {
    uint32_t seq;
    uint8_t key_len;
    uint8_t opts_len;
    uint8_t key[GDP_REFLECT_KEY_LEN];
    uint8_t opts[GDP_MAX_OPTIONS_LEN];
};

struct gdp_auth;

struct gdp_tunnel {
    /* Filled by the caller before gdp_tunnel_prepare. */
    int dev_fd;
    int mode;
    int family; /* 4 or 6 */
    uint32_t vni;
    uint16_t port; /* destination UDP port */
    uint8_t remote[16];
    uint8_t local[16];
    uint8_t mac[6];
    uint8_t ttl; /* 0: inherit the inner TTL / hop limit */
    uint8_t tos;
    int tos_set; /* GDP_TOS_UNSET (DSCP 0), GDP_TOS_FIXED (tos), GDP_TOS_INHERIT */
    int df;
    int udp_csum;
    uint32_t underlay_mtu;
    uint8_t opts[GDP_MAX_OPTIONS_LEN];
    uint32_t opts_len;
    struct gdp_reflect_entry *reflect; /* NULL: no reflection */
    uint32_t reflect_slots;            /* a power of two */
    int vnet_hdr; /* device opened with IFF_VNET_HDR (GDP_VNET_LEN) and TSO offloads */
    /* The device takes UDP_L4 super-frames (VIRTIO_NET_HDR_GSO_UDP_L4, Linux 6.2+):
     * received runs of one UDP flow are written as one. */
    int rx_uso;
    /* UDP sockets (bound, connected to the remote) for UDP GSO sends of TSO
     * segments, picked by flow hash; their ports are then the flow's source ports. */
    int gso_fds[8];
    uint16_t gso_ports[8];
    uint32_t n_gso;
    /* The raw socket this tunnel's outer packets leave by when no UDP socket above
     * takes them (0: the engine's raw_fd). A tunnel whose outer packets carry a mark
     * has its own, with SO_MARK set. */
    int raw_fd;
    /* The sockets send without a UDP checksum (SO_NO_CHECK; IPv4 only): the kernel
     * refuses UDP GSO there, so segments go one datagram each by sendmmsg (a
     * connected socket's cached route instead of a route lookup per packet). */
    int gso_nocsum;
    /* The inject device (a TAP with UDP tunnel GSO, Linux 6.17+): a TSO
     * super-frame is written to it whole behind its outer headers, the kernel
     * forwards it to the underlay and segments it only where a device must,
     * as it does for its own tunnels. IPv4 underlay without checksum only.
     * Used while ``inject`` is set; the supervisor clears it if the kernel does
     * not forward what is written there. */
    int inject;
    int inj_fd;
    uint8_t inj_mac[6];
    uint32_t dev_mtu; /* the tunnel device's MTU: the MSS of received super-packets */
    /* The device the route to the remote leaves by ("": unknown). While it is
     * down nothing is injected: sockets then fail, and count, what the kernel
     * would drop unseen behind the inject device. */
    char underlay_ifname[16];
    /* Authenticated tunnel (auth.h): every packet sent carries the integrity option,
     * which ends the configured options ``opts`` (the caller puts it there unsigned),
     * and every packet received must verify. NULL: off. Shared by the workers. The
     * inject device and UDP runs must be off with it: one MAC covers one wire packet. */
    struct gdp_auth *auth;
    /* Set by gdp_tunnel_prepare. */
    uint32_t hdr_len;     /* GENEVE header length with the configured options */
    uint32_t max_inner;   /* largest inner frame that fits the underlay unfragmented */
    uint8_t hdr[GDP_MAX_HEADER_LEN];
    /* The outer IP and UDP headers as every packet of the tunnel starts (addresses,
     * TTL, protocol, destination port), patched per packet (encap.c). */
    uint8_t outer[40 + 8];
    uint64_t outer_psum; /* the UDP pseudo-header sum over the addresses and protocol */
    /* Counters, written only by the engine threads. */
    struct gdp_counters counters;
};

struct gdp_sock_stats {
    uint64_t drops[GDP_DROP_COUNT]; /* only the socket-level reasons are used */
    uint64_t rx_queue_overflow;     /* SO_RXQ_OVFL: dropped by the kernel before us */
    uint64_t rx_packets;            /* datagrams read from the socket */
    /* Busy polling (gdp_engine_config.busy_poll_ns): rounds of polling that found
     * packets, on the receive and on the transmit side (each written by its thread). */
    uint64_t busy_poll_hits_rx;
    uint64_t busy_poll_hits_tx;
};

struct gdp_engine_config {
    int family;
    int udp_fd;      /* bound, nonblocking, IP_RECVTOS/IPV6_RECVTCLASS and SO_RXQ_OVFL on */
    int raw_fd;      /* raw IPPROTO_RAW socket with header inclusion, nonblocking */
    int stop_fd;     /* readable (eventfd) when the workers must return */
    int control_fd;  /* nonblocking datagram socket for O-bit packets, or -1 */
    uint16_t sport_min;
    uint16_t sport_max;
    uint32_t hash_seed;
    /* Where this engine starts counting outer IPv4 IDs: workers of one port start
     * apart, so their fragments do not share IDs. */
    uint32_t ip_id_start;
    uint32_t control_tag; /* ORed into the tunnel index that prefixes a control message */
    /* Busy polling (0: off). When one direction has forwarded something, it kicks the
     * other through that side's eventfd (at most once per window), and the other then
     * polls its own input for busy_poll_ns without sleeping: the answer to what was
     * forwarded (a local program's reply, the remote's response) finds it running
     * instead of waiting for a wake-up. Nothing is polled while no traffic flows. */
    uint32_t busy_poll_ns;
    int kick_rx_fd; /* eventfd the receive side polls on, or -1 */
    int kick_tx_fd; /* eventfd the transmit side polls on, or -1 */
};

struct gdp_engine;

/* Error codes of the setup functions (engine_c.py maps them to exceptions). */
#define GDP_E_ENGINE_TOO_MANY (-20)
#define GDP_E_ENGINE_BUFFER (-21)
#define GDP_E_ENGINE_CONFIG (-22)
#define GDP_E_ENGINE_HEADER (-23)

/* Bytes the caller must allocate for the opaque engine (zeroed). */
size_t gdp_engine_size(void);
/* Bytes of packet buffers the caller must allocate for one engine. */
size_t gdp_engine_buffers_size(void);

/* Build the header template and the MTU limits of a filled-in tunnel. */
int gdp_tunnel_prepare(struct gdp_tunnel *t);

/* Attach config, tunnels (array of n), buffers and socket counters. */
int gdp_engine_init(struct gdp_engine *e, const struct gdp_engine_config *cfg,
                    struct gdp_tunnel *tunnels, uint32_t n, uint8_t *bufs,
                    size_t bufs_len, struct gdp_sock_stats *stats);

/* Forward one direction (GDP_DIR_RX or GDP_DIR_TX) until stop_fd becomes readable;
 * one thread each. Returns 0 when stopped, GDP_E_ENGINE_CONFIG for another ``dirs``,
 * or -errno when a socket or poll fails in a way that cannot be counted and skipped. */
int gdp_engine_run(struct gdp_engine *e, int dirs);

/* Names of the drop reasons and counters (counters.h), for Python. */
const char *gdp_drop_name(unsigned i);
int gdp_drop_on_socket(unsigned i); /* counted per socket (1) or per tunnel (0) */
const char *gdp_counter_name(unsigned i);
uint64_t gdp_counter_get(const struct gdp_counters *c, unsigned i);

/* Pure helpers, exposed for tests. */
uint16_t gdp_inet_csum(const uint8_t *buf, size_t len);
uint32_t gdp_flow_hash(const uint8_t *frame, size_t len, int mode, uint32_t seed);

#endif
