/* libFuzzer harness for the receive coalescing of csrc/gro.c (through gdp_test_gro in
 * csrc/testpoints.c, the functions the receive path runs).
 *
 * Input: byte 0 picks the mode (TAP/TUN), UDP runs on or off, the receive batch size
 * (gro_hold: payloads copied out before their buffers are reused) and the outer source
 * ports; then frames. A frame is either raw bytes from the input or derived from the
 * previous one (the next segment of its flow: sequence number, IPv4 ID, payload size
 * and bytes from the input, and one header byte perhaps flipped), so the merge paths
 * are reached and the fuzzer varies what tells segments apart. IP lengths and IPv4,
 * TCP and UDP checksums are made valid unless the frame's control byte says not.
 *
 * Invariant checked for each input: the outputs account for the frames in order.
 * An output behind an all-zero virtio header is the next frame unchanged. A GSO output
 * holds k >= 2 next frames: its first hdr_len bytes are the first frame's headers (IP
 * length, IPv4 checksum, UDP length, L4 checksum and TCP PSH aside), its payload the
 * frames' payloads in order, each of gso_size bytes but the last, which is not longer;
 * its IP length spans the frame, its IPv4 header checksum verifies and its L4 checksum
 * field holds the pseudo-header sum (CHECKSUM_PARTIAL).
 * With -DGDP_FUZZ_SELFTEST an input starting "GRO!" plants a miscount the check must
 * catch. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_bytes.h"
#include "testpoints.h"

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "fuzz_gro: check failed at line %d: %s\n", __LINE__, #cond); \
            abort();                                                                     \
        }                                                                                \
    } while (0)

#define MAX_FRAMES 80
#define FRAME_MAX 2048

static uint8_t frames[MAX_FRAMES][FRAME_MAX];
static uint32_t lens[MAX_FRAMES];
static uint8_t flat[MAX_FRAMES * FRAME_MAX];
static uint8_t out[MAX_FRAMES * (FRAME_MAX + 12) + 65536];
static uint32_t out_lens[MAX_FRAMES];
static uint16_t ports[MAX_FRAMES];

/* Where IP starts (-1: not IP) and its version. */
static int ip_start(const uint8_t *f, size_t len, int tap, int *ver) {
    size_t off = 0;
    if (tap) {
        if (len < 14)
            return -1;
        uint32_t type = ld16(f + 12);
        off = 14;
        if (type == 0x8100 && len >= 18) {
            type = ld16(f + 16);
            off = 18;
        }
        if (type != 0x0800 && type != 0x86DD)
            return -1;
    }
    if (len < off + 1)
        return -1;
    *ver = f[off] >> 4;
    return (*ver == 4 || *ver == 6) ? (int)off : -1;
}

/* The pseudo-header sum for an L4 message of len bytes. */
static uint32_t pseudo(const uint8_t *ip, int ver, uint8_t proto, size_t len) {
    uint32_t s = ver == 4 ? sum16(ip + 12, 8, 0) : sum16(ip + 8, 32, 0);
    return s + proto + (uint32_t)len;
}

/* Make lengths and checksums valid (as a sender's stack would have). */
static void fix(uint8_t *f, size_t len, int tap, int udp_len_too) {
    int ver;
    int off = ip_start(f, len, tap, &ver);
    if (off < 0)
        return;
    uint8_t *ip = f + off;
    size_t left = len - (size_t)off, l4;
    uint8_t proto;
    if (ver == 4) {
        size_t ihl = (size_t)(ip[0] & 15) * 4;
        if (left < 20 || ihl < 20 || ihl > left)
            return;
        st16(ip + 2, (uint32_t)left);
        st16(ip + 10, 0);
        st16(ip + 10, (uint16_t)~fold(sum16(ip, ihl, 0)));
        if (ld16(ip + 6) & 0x3FFF)
            return;
        l4 = ihl;
        proto = ip[9];
    } else {
        if (left < 40)
            return;
        st16(ip + 4, (uint32_t)(left - 40));
        l4 = 40;
        proto = ip[6];
    }
    size_t n = left - l4;
    uint8_t *m = ip + l4;
    if (proto == 6 && n >= 20) {
        st16(m + 16, 0);
        st16(m + 16, (uint16_t)~fold(sum16(m, n, pseudo(ip, ver, 6, n))));
    } else if (proto == 17 && n >= 8) {
        if (udp_len_too)
            st16(m + 4, (uint32_t)n);
        st16(m + 6, 0);
        uint16_t cs = (uint16_t)~fold(sum16(m, n, pseudo(ip, ver, 17, n)));
        st16(m + 6, cs ? cs : 0xFFFF);
    }
}

/* The next segment of the flow of ``prev``: payload of plen bytes from src. */
static size_t derive(uint8_t *f, const uint8_t *prev, size_t prev_len, int tap, size_t plen,
                     const uint8_t *src, size_t src_len) {
    int ver;
    int off = ip_start(prev, prev_len, tap, &ver);
    size_t l4 = 0, hdrs = 0;
    uint8_t proto = 0;
    if (off >= 0) {
        const uint8_t *ip = prev + off;
        l4 = (size_t)off + (ver == 4 ? (size_t)(ip[0] & 15) * 4 : 40);
        proto = ver == 4 ? ip[9] : ip[6];
        if (proto == 6 && l4 + 20 <= prev_len)
            hdrs = l4 + (size_t)(prev[l4 + 12] >> 4) * 4;
        else if (proto == 17)
            hdrs = l4 + 8;
    }
    if (!hdrs || hdrs > prev_len || hdrs + plen > FRAME_MAX) {
        memcpy(f, prev, prev_len);
        return prev_len;
    }
    memcpy(f, prev, hdrs);
    for (size_t i = 0; i < plen; i++)
        f[hdrs + i] = src_len ? src[i % src_len] : (uint8_t)i;
    if (proto == 6) /* the sequence number moves on by the previous payload */
        st16(f + l4 + 6, ld16(prev + l4 + 6) + (uint32_t)(prev_len - hdrs));
    if (ver == 4)
        st16(f + off + 4, ld16(prev + off + 4) + 1);
    return hdrs + plen;
}

/* The headers a merged output may differ in from its first frame. */
static void check_headers(const uint8_t *o, const uint8_t *first, size_t hdrs, int tap) {
    int ver;
    int off = ip_start(o, hdrs, tap, &ver);
    CHECK(off >= 0);
    CHECK(!memcmp(o, first, (size_t)off));
    const uint8_t *ip = o, *fi = first;
    ip += off;
    fi += off;
    if (ver == 4) {
        CHECK(!memcmp(ip, fi, 2) && !memcmp(ip + 4, fi + 4, 6) && !memcmp(ip + 12, fi + 12, 8));
        size_t l4 = (size_t)off + 20;
        uint8_t proto = ip[9];
        if (proto == 6) {
            CHECK(!memcmp(o + 20 + off, first + 20 + off, 13));
            CHECK((o[l4 + 13] & ~0x08) == (first[l4 + 13] & ~0x08));
            CHECK(!memcmp(o + l4 + 14, first + l4 + 14, 2) &&
                  !memcmp(o + l4 + 18, first + l4 + 18, hdrs - l4 - 18));
        } else {
            CHECK(!memcmp(o + l4, first + l4, 4));
        }
    } else {
        CHECK(!memcmp(ip, fi, 4) && !memcmp(ip + 6, fi + 6, 34));
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2)
        return 0;
    uint8_t sel = data[0];
    int tap = !(sel & 1);
    int uso = (sel & 2) != 0;
    uint32_t hold = (uint32_t)((sel >> 2) & 3) * 2; /* 0, 2, 4, 6 */
    int port_changes = (sel & 0x10) != 0;
    size_t pos = 1;
    uint32_t n = 0;
    size_t flat_len = 0;
    while (pos < size && n < MAX_FRAMES) {
        uint8_t ctl = data[pos++];
        size_t len;
        if ((ctl & 3) != 0 && n > 0) {
            /* Derived: the payload size from the next two bytes, bytes from the input. */
            size_t plen = pos + 2 <= size ? ld16(data + pos) % 1500 : 1;
            pos += 2;
            const uint8_t *src = pos < size ? data + pos : data;
            size_t src_len = pos < size ? size - pos : 1;
            len = derive(frames[n], frames[n - 1], lens[n - 1], tap, plen, src, src_len);
            if ((ctl & 3) == 3 && pos < size && len) { /* flip one byte in the headers */
                size_t at = data[pos++] % (len < 80 ? len : 80);
                frames[n][at] ^= (uint8_t)(1u << (ctl >> 5));
            }
        } else {
            len = pos + 2 <= size ? ld16(data + pos) % FRAME_MAX : 0;
            pos += 2;
            if (len > size - (pos < size ? pos : size))
                len = size - (pos < size ? pos : size);
            memcpy(frames[n], data + (pos < size ? pos : size), len);
            pos += len;
        }
        if (!(ctl & 4))
            fix(frames[n], len, tap, !(ctl & 8));
        lens[n] = (uint32_t)len;
        ports[n] = (uint16_t)(port_changes && (ctl & 16) ? 1 : 0);
        memcpy(flat + flat_len, frames[n], len);
        flat_len += len;
        n++;
    }
    int got = gdp_test_gro(flat, lens, n, tap ? 0 : 1, uso, ports, hold, out, sizeof(out),
                           out_lens, MAX_FRAMES);
    CHECK(got >= 0);
#ifdef GDP_FUZZ_SELFTEST
    if (size >= 4 && memcmp(data, "GRO!", 4) == 0 && got > 0)
        out_lens[0]++; /* a planted miscount the check must catch */
#endif
    /* Walk the outputs against the frames. */
    size_t o_at = 0;
    uint32_t j = 0;
    for (int i = 0; i < got; i++) {
        const uint8_t *vh = out + o_at;
        const uint8_t *o = vh + 12;
        CHECK(out_lens[i] >= 12);
        size_t olen = out_lens[i] - 12;
        o_at += out_lens[i];
        CHECK(j < n);
        if (vh[1] == 0) {
            static const uint8_t zero[12];
            CHECK(!memcmp(vh, zero, 12));
            CHECK(olen == lens[j] && !memcmp(o, frames[j], olen));
            j++;
            continue;
        }
        CHECK(vh[0] == 1 && (vh[1] == 1 || vh[1] == 4 || vh[1] == 5));
        size_t hdrs = le16(vh + 2), seg = le16(vh + 4), cstart = le16(vh + 6);
        size_t coff = le16(vh + 8);
        CHECK(hdrs < olen && seg > 0 && cstart + coff + 2 <= hdrs);
        check_headers(o, frames[j], hdrs, tap);
        size_t p = hdrs;
        uint32_t k = 0;
        while (p < olen) {
            CHECK(j < n && lens[j] > hdrs);
            size_t plen = lens[j] - hdrs;
            CHECK(plen <= seg && p + plen <= olen);
            CHECK(!memcmp(o + p, frames[j] + hdrs, plen));
            CHECK(p + plen == olen || plen == seg);
            p += plen;
            j++;
            k++;
        }
        CHECK(k >= 2);
        int ver;
        int off = ip_start(o, olen, tap, &ver);
        CHECK(off >= 0);
        const uint8_t *ip = o + off;
        if (ver == 4) {
            CHECK(ld16(ip + 2) == olen - (size_t)off);
            CHECK(fold(sum16(ip, 20, 0)) == 0xFFFF);
        } else {
            CHECK(ld16(ip + 4) + 40 == olen - (size_t)off);
        }
        uint8_t proto = ver == 4 ? ip[9] : ip[6];
        uint16_t field = (uint16_t)ld16(o + cstart + coff);
        CHECK(field == fold(pseudo(ip, ver, proto, olen - cstart)));
    }
    CHECK(j == n && o_at <= sizeof(out));
    return 0;
}
