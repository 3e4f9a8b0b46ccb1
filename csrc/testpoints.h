/* Test entry points into the pure parts (testpoints.c); cffi reads the cdef part below
 * (build_fastpath.py). Frames are inner frames as the device sees them (Ethernet in
 * GDP_MODE_TAP, IP in GDP_MODE_TUN). */
#ifndef GDP_TESTPOINTS_H
#define GDP_TESTPOINTS_H

#include <stddef.h>
#include <stdint.h>

/* cdef-begin: up to cdef-end, build_fastpath.py hands these lines to cffi as they are,
 * so they keep to what its cdef accepts (a macro is a plain integer, no includes). */
struct gdp_engine;

#define GDP_TEST_ICMP_BUF 1294 /* ICMP_BUF of seg.h */

/* parse_inner: returns its rc; out = ipver, ip_off, ip_len, ecn, df, proto, ports,
 * sport, dport. */
int gdp_test_parse_inner(const uint8_t *f, size_t len, int mode, uint32_t out[9]);
uint16_t gdp_test_l4_csum(const uint8_t *ip, int ipver, uint8_t proto, const uint8_t *msg,
                          size_t len);
uint16_t gdp_test_partial_field(const uint8_t *ip, int ipver, uint8_t proto, size_t len);
uint16_t gdp_test_csum_update16(uint16_t check, uint16_t old, uint16_t new_);

/* Receive coalescing of n frames (concatenated in ``frames``) of one tunnel, as the
 * receive path writes them: each output is a virtio header and a frame, laid end to end
 * in out with its length in out_lens. osports (or NULL: all 0) are the outer source
 * ports the frames came with; hold_every: frames per receive batch (0: one buffer,
 * reused by each frame). Returns the number of outputs, -1 when out is too small. */
int gdp_test_gro(const uint8_t *frames, const uint32_t *lens, uint32_t n, int mode, int uso,
                 const uint16_t *osports, uint32_t hold_every, uint8_t *out, size_t cap,
                 uint32_t *out_lens, uint32_t max_out);

/* TSO segmentation of a super-frame with its virtio header: each segment's inner frame
 * in out. Returns the count, -1 when the frame is refused (counted tx_bad_frame), -2
 * when out is too small. */
int gdp_test_seg(const uint8_t *f, size_t flen, int mode, const uint8_t vnet[12],
                 uint8_t *out, size_t cap, uint32_t *out_lens, uint32_t max_out);

/* Super-packet recognition on receive (gso_size: what UDP_GRO reported for the
 * datagram, 0 for nothing): 1 when f is one (out = udp, hdrs, seg size, segments; f
 * and vnet prepared as for the device), else 0. */
int gdp_test_super_plan(uint8_t *f, size_t flen, int mode, int uso, uint32_t max_inner,
                        uint32_t dev_mtu, uint32_t gso_size, uint32_t out[4], uint8_t vnet[12]);

/* The ICMP too-big reply for frame f announcing mtu; its length (0: none). */
size_t gdp_test_icmp_too_big(const uint8_t *f, size_t flen, int mode, uint32_t mtu,
                             uint8_t out[1294]);

/* One datagram through the receive path of an initialised engine (rx.c rx_one, then
 * the coalescing buffer flushed), from outer source ``src`` (4 or 16 bytes) with outer
 * TOS ``tos``; ``whole``: may be a super-packet. What it does shows on the tunnels'
 * dev_fd and the engine's control_fd and counters. */
void gdp_test_rx_one(struct gdp_engine *e, uint8_t *pkt, size_t len, const uint8_t *src,
                     uint8_t tos, int whole);
/* cdef-end */

#endif
