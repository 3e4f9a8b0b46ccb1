/* Receive coalescing (offload mode), pure: consecutive in-order segments of one TCP
 * flow are merged into one super-frame written with a virtio GSO header, so the
 * kernel's TCP stack handles one packet instead of dozens (what GRO does for a kernel
 * tunnel). Runs of same-sized datagrams of one UDP flow are merged the same way into
 * a UDP_L4 super-frame, which the kernel splits back into the very same datagrams
 * (IP IDs included) after one pass through its IP layer.
 *
 * No I/O: gro_offer decides, gro_finish hands back the super-frame as iovecs; the
 * caller writes it. */
#ifndef GDP_GRO_H
#define GDP_GRO_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "engine.h"
#include "inner.h"

#define GRO_MAX_PIECES 64 /* segments per coalesced super-frame */
/* Datagrams per coalesced UDP super-frame: the kernel's UDP_MAX_SEGMENTS is 64 on
 * older kernels (128 since 6.x); stay under the smaller. */
#define USO_MAX_SEGS 64
#define GRO_MAX_LEN 65000 /* a super-frame's bytes, headers included */
#define SEG_INNER_MAX 192 /* Ethernet + VLAN + IPv6 or IPv4 with options + TCP + options */

/* The packet a received inner frame came in: its GENEVE header and outer source port.
 * What every merged packet must share beyond its inner headers (RFC 8926 §4.6, as the
 * kernel's GENEVE GRO compares); the outer addresses are the tunnel's. */
struct outer_id {
    const uint8_t *ghdr;
    size_t ghlen;
    uint16_t sport;
};

struct gro_state {
    int active;
    uint32_t idx; /* the tunnel */
    size_t len;
    size_t ip_off, l4, hdrs, mss, last_plen;
    int ipver;
    uint8_t proto; /* 6 (TCP) or 17 (UDP) */
    int psh;
    uint32_t next_seq;
    uint16_t next_id; /* UDP over IPv4: the ID the next datagram must carry */
    uint32_t nseg;
    /* The super-frame is buf[0 .. hdrs) (the first segment's headers, rewritten at
     * finish) followed by the payloads, which stay where they were received: piece[i]
     * points into the caller's buffers until gro_hold copies them here, before those
     * buffers are reused. */
    struct iovec piece[GRO_MAX_PIECES];
    int held; /* the payloads are copied into buf after the headers */
    uint8_t ghdr[GDP_MAX_HEADER_LEN];
    size_t ghlen;
    uint16_t osport;
    uint8_t buf[GDP_BUF_SIZE];
};

/* A segment gro_offer found coalescible. */
struct gro_seg {
    uint8_t proto;
    size_t l4, hdrs;
    int psh;
    uint32_t next_seq;
    uint16_t next_id;
};

#define GRO_SKIP 0   /* not coalescible: flush the pending super-frame, write this as is */
#define GRO_MERGED 1 /* appended to the pending super-frame */
#define GRO_START 2  /* flush the pending super-frame, then gro_start with ``s`` */

/* Offer a received inner frame of tunnel ``idx`` (``uso``: the tunnel's device takes
 * UDP_L4 super-frames). A TCP segment is coalescible when it is a plain ACK (+PSH)
 * carrying data with a valid checksum; a UDP datagram when its length agrees with IP's
 * and its checksum is valid (or absent, over IPv4). */
int gro_offer(struct gro_state *g, uint32_t idx, const uint8_t *f, size_t flen,
              const struct inner *in, const struct outer_id *o, int uso, struct gro_seg *s);

/* Start a super-frame with this segment: its headers copied, its payload in place. */
void gro_start(struct gro_state *g, uint32_t idx, const uint8_t *f, size_t flen,
               const struct inner *in, const struct outer_id *o, const struct gro_seg *s);

/* Copy the pending payloads into the state's own buffer: the buffers they sit in are
 * about to be reused. */
void gro_hold(struct gro_state *g);

/* A finished super-frame: iov[0..n) is the virtio header (vh), the headers and the
 * payloads, len bytes in all. */
struct gro_out {
    uint32_t idx;
    uint32_t nseg;
    size_t len;
    int n;
    uint8_t vh[GDP_VNET_LEN];
    struct iovec iov[GRO_MAX_PIECES + 2];
};

/* Finish the pending super-frame, if any (returns 0 when none). Merged segments get
 * the IP length (and IPv4 checksum) of the whole, the UDP length of the whole, a
 * partial L4 checksum and a GSO virtio header; a lone segment stays as received
 * behind an all-zero virtio header. */
int gro_finish(struct gro_state *g, struct gro_out *out);

#endif
