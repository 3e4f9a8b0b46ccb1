/* Segmentation, pure: TSO super-frames cut into TCP segments, the header of a UDP run
 * sent as one UDP_L4 super-frame, received GSO super-packets recognised and prepared
 * for the device, and the ICMP too-big reply. Buffers in, bytes out; no fds. */
#ifndef GDP_SEG_H
#define GDP_SEG_H

#include <stddef.h>
#include <stdint.h>

#include "engine.h"
#include "gro.h"
#include "inner.h"
#include "proto.h"

/* How a TCP super-frame (a virtio TSO frame) is cut. */
struct seg_plan {
    int ipver;
    size_t ipo, l4, hdrs, mss;
    uint16_t ip_id;
    uint32_t seq;
    uint8_t flags;
};

/* Check a TSO frame against its virtio header and plan its segments; -1 when the
 * frame is not a TCP super-frame this engine can cut. ``in`` is parsed here. */
int seg_tcp_plan(const uint8_t *f, size_t flen, int mode, const struct vnet_hdr *v,
                 struct inner *in, struct seg_plan *p);

/* Write segment i (payload f[off .. off + n), the last one when ``last``) as its own
 * inner headers at ``ih``: IP length, ID (IPv4) and checksum, sequence number, flags
 * (FIN and PSH on the last only, CWR on the first only) and a full TCP checksum. */
void seg_tcp_headers(const uint8_t *f, const struct seg_plan *p, size_t i, size_t off,
                     size_t n, int last, uint8_t *ih);

/* The headers of a UDP run of ``slen`` bytes as one UDP_L4 super-frame, from the first
 * datagram's f0: IP length (and IPv4 checksum) of the whole; the UDP length stays one
 * datagram's, which tells the receiver the segment size. */
void seg_uso_headers(const uint8_t *f0, size_t ip_off, size_t l4, size_t slen, uint8_t *out);

/* A received GSO super-packet (the inner frame of one datagram that was neither
 * reassembled from fragments nor batched by UDP GRO). */
struct super_plan {
    int udp;
    size_t l4, hdrs, seg, nseg;
};

/* Whether a received inner frame is a super-packet of a peer's inject device: one
 * underlay datagram carrying an inner super-frame whose checksum field holds only the
 * pseudo-header sum. TCP: longer than one underlay packet could carry (``max_inner``),
 * cut at the device's MTU (``dev_mtu``). UDP (``uso``: the device takes UDP_L4
 * super-frames): the kernel reported the datagram's segment size (``gso_size``, from
 * UDP_GRO; 0 for none) and it is the inner datagrams' size, so it never becomes more
 * datagrams than the kernel received. Returns 0 when it is not one. */
int super_plan(const uint8_t *f, size_t flen, const struct inner *in, int uso,
               uint32_t max_inner, uint32_t dev_mtu, size_t gso_size, struct super_plan *p);

/* Prepare a super-packet for a device with a virtio header: vh gets the GSO header;
 * a UDP super-frame's length and partial checksum become the whole frame's. */
void super_vnet(uint8_t *f, size_t flen, const struct inner *in, const struct super_plan *p,
                uint8_t vh[GDP_VNET_LEN]);

/* ICMP "fragmentation needed" / ICMPv6 "packet too big" for the inner packet in f,
 * from its destination to its source (with swapped Ethernet addresses in TAP mode),
 * announcing ``mtu``. Returns its length in out (at most ICMP_BUF), or 0 when this
 * packet gets none (IPv4 without DF, an ICMP error, an MTU under the minimum). */
#define ICMP_BUF (ETH_HLEN + IP6_HLEN + ICMP_HLEN + 1232)
size_t icmp_too_big(const uint8_t *f, const struct inner *in, int tap, uint32_t mtu,
                    uint8_t *out);

#endif
