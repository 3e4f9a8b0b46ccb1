/* Entry points for tests and fuzzers into the pure parts of the engine: inner parsing,
 * checksums, receive coalescing, TSO segmentation, super-packet recognition and the
 * ICMP too-big builder, on caller buffers (no fds, no engine). Each runs the same
 * functions the forwarding paths run. */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "csum.h"
#include "engine.h"
#include "gro.h"
#include "inner.h"
#include "seg.h"
#include "testpoints.h"

int gdp_test_parse_inner(const uint8_t *f, size_t len, int mode, uint32_t out[9]) {
    struct inner in;
    int rc = parse_inner(f, len, mode, &in);
    uint32_t v[9] = {(uint32_t)in.ipver, (uint32_t)in.ip_off, (uint32_t)in.ip_len, in.ecn,
                     (uint32_t)in.df, in.proto, (uint32_t)in.ports, in.sport, in.dport};
    memcpy(out, v, sizeof(v));
    return rc;
}

uint16_t gdp_test_l4_csum(const uint8_t *ip, int ipver, uint8_t proto, const uint8_t *msg,
                          size_t len) {
    return l4_csum(ip, ipver, proto, msg, len);
}

uint16_t gdp_test_partial_field(const uint8_t *ip, int ipver, uint8_t proto, size_t len) {
    return partial_field(ip, ipver, proto, len);
}

uint16_t gdp_test_csum_update16(uint16_t check, uint16_t old, uint16_t new_) {
    return csum_update16(check, old, new_);
}

/* Append iov[0..n) to out at *used; -1 when it does not fit. */
static int put_iov(const struct iovec *iov, int n, uint8_t *out, size_t cap, size_t *used) {
    for (int i = 0; i < n; i++) {
        if (iov[i].iov_len > cap - *used)
            return -1;
        memcpy(out + *used, iov[i].iov_base, iov[i].iov_len);
        *used += iov[i].iov_len;
    }
    return 0;
}

struct outputs {
    uint8_t *out;
    size_t cap, used;
    uint32_t *lens;
    uint32_t max, n;
};

static int emit(struct outputs *o, const struct iovec *iov, int n) {
    size_t before = o->used;
    if (o->n >= o->max || put_iov(iov, n, o->out, o->cap, &o->used) < 0)
        return -1;
    o->lens[o->n++] = (uint32_t)(o->used - before);
    return 0;
}

static int emit_gro(struct gro_state *g, struct outputs *o) {
    struct gro_out fin;
    if (!gro_finish(g, &fin))
        return 0;
    return emit(o, fin.iov, fin.n);
}

int gdp_test_gro(const uint8_t *frames, const uint32_t *lens, uint32_t n, int mode, int uso,
                 const uint16_t *osports, uint32_t hold_every, uint8_t *out, size_t cap,
                 uint32_t *out_lens, uint32_t max_out) {
    struct gro_state *g = malloc(sizeof(*g));
    if (!g)
        return -2;
    memset(g, 0, offsetof(struct gro_state, buf)); /* the buffer needs no zeroing */
    static const uint8_t vnet_zero[GDP_VNET_LEN];
    static const uint8_t ghdr[8] = {0, 0, 0x65, 0x58, 0, 0, 1, 0};
    struct outputs o = {out, cap, 0, out_lens, max_out, 0};
    /* Frames are received into buffers that are reused: copies that live until held. */
    size_t biggest = 1;
    for (uint32_t i = 0; i < n; i++)
        if (lens[i] > biggest)
            biggest = lens[i] < 65536 ? lens[i] : 65536;
    uint8_t *copies = malloc(biggest * (size_t)(hold_every ? hold_every : 1));
    size_t pos = 0, slot = 0;
    int rc = 0;
    for (uint32_t i = 0; i < n && rc == 0 && copies; i++) {
        const uint8_t *f0 = frames + pos;
        size_t flen = lens[i] < 65536 ? lens[i] : 65536;
        pos += lens[i];
        if (hold_every && i % hold_every == 0) {
            gro_hold(g); /* the next receive batch refills the buffers */
            slot = 0;
        }
        uint8_t *f = copies + biggest * slot;
        if (hold_every)
            slot++;
        else
            gro_hold(g); /* one buffer, reused by every frame */
        memcpy(f, f0, flen);
        struct inner in;
        struct outer_id oid = {ghdr, sizeof(ghdr), osports ? osports[i] : 0};
        struct gro_seg s;
        int v = parse_inner(f, flen, mode, &in) < 0 ? GRO_SKIP
                                                    : gro_offer(g, 0, f, flen, &in, &oid, uso, &s);
        if (v == GRO_MERGED)
            continue;
        rc = emit_gro(g, &o);
        if (v == GRO_START) {
            gro_start(g, 0, f, flen, &in, &oid, &s);
        } else if (rc == 0) {
            struct iovec iov[2] = {{(void *)vnet_zero, GDP_VNET_LEN}, {f, flen}};
            rc = emit(&o, iov, 2);
        }
    }
    if (rc == 0 && copies)
        rc = emit_gro(g, &o);
    free(copies);
    free(g);
    return copies == NULL ? -2 : rc < 0 ? -1 : (int)o.n;
}

int gdp_test_seg(const uint8_t *f, size_t flen, int mode, const uint8_t vnet[GDP_VNET_LEN],
                 uint8_t *out, size_t cap, uint32_t *out_lens, uint32_t max_out) {
    struct vnet_hdr v = vnet_get(vnet);
    struct inner in;
    struct seg_plan p;
    if (seg_tcp_plan(f, flen, mode, &v, &in, &p) < 0)
        return -1;
    struct outputs o = {out, cap, 0, out_lens, max_out, 0};
    uint8_t ih[SEG_INNER_MAX];
    for (size_t off = p.hdrs, i = 0; off < flen; off += p.mss, i++) {
        size_t n = flen - off < p.mss ? flen - off : p.mss;
        seg_tcp_headers(f, &p, i, off, n, off + n >= flen, ih);
        struct iovec iov[2] = {{ih, p.hdrs}, {(void *)(f + off), n}};
        if (emit(&o, iov, 2) < 0)
            return -2;
    }
    return (int)o.n;
}

int gdp_test_super_plan(uint8_t *f, size_t flen, int mode, int uso, uint32_t max_inner,
                        uint32_t dev_mtu, uint32_t gso_size, uint32_t out[4],
                        uint8_t vnet[GDP_VNET_LEN]) {
    struct inner in;
    struct super_plan p;
    if (parse_inner(f, flen, mode, &in) < 0 ||
        !super_plan(f, flen, &in, uso, max_inner, dev_mtu, gso_size, &p))
        return 0;
    uint32_t v[4] = {(uint32_t)p.udp, (uint32_t)p.hdrs, (uint32_t)p.seg, (uint32_t)p.nseg};
    memcpy(out, v, sizeof(v));
    super_vnet(f, flen, &in, &p, vnet);
    return 1;
}

size_t gdp_test_icmp_too_big(const uint8_t *f, size_t flen, int mode, uint32_t mtu,
                             uint8_t out[ICMP_BUF]) {
    struct inner in;
    if (parse_inner(f, flen, mode, &in) < 0 || !in.ipver)
        return 0;
    return icmp_too_big(f, &in, mode == GDP_MODE_TAP, mtu, out);
}
