/* libFuzzer harness for TSO segmentation (csrc/seg.c, through gdp_test_seg in
 * csrc/testpoints.c, the functions the transmit path runs), and its round trip
 * through receive coalescing (gdp_test_gro).
 *
 * Input: byte 0 picks the mode (TAP/TUN) and whether the frame is made consistent
 * first; bytes 1..10 are the virtio header (flags, GSO type, hdr_len, gso_size,
 * csum_start, csum_offset); the rest is the frame. Made consistent: IP length, IPv4
 * header checksum, csum_start at the TCP header and the TCP checksum field holding
 * the pseudo-header sum (as a TAP device hands a TSO frame over), so the fuzzer
 * reaches the cutting rather than the refusals.
 *
 * Invariants, for a frame gdp_test_seg cuts: every segment's TCP checksum verifies,
 * its IP length is its own, its sequence number is the super-frame's plus the bytes
 * before it, no segment carries more than gso_size bytes, and the payloads put
 * together are the super-frame's. Then the segments, coalesced again, give back the
 * payload byte for byte (whatever coalescing merges or leaves alone).
 * With -DGDP_FUZZ_SELFTEST an input starting "SEG!" plants a bad count the check must
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
            fprintf(stderr, "fuzz_seg: check failed at line %d: %s\n", __LINE__, #cond); \
            abort();                                                                     \
        }                                                                                \
    } while (0)

#define MAX_SEGS 1024
#define FRAME_MAX 65536

static uint8_t frame[FRAME_MAX];
static uint8_t segs[2 * FRAME_MAX + MAX_SEGS * 256];
static uint32_t seg_lens[MAX_SEGS];
static uint8_t back[2 * FRAME_MAX + MAX_SEGS * 256];
static uint32_t back_lens[MAX_SEGS];

static uint32_t pseudo(const uint8_t *ip, int ver, size_t len) {
    return (ver == 4 ? sum16(ip + 12, 8, 0) : sum16(ip + 8, 32, 0)) + 6 + (uint32_t)len;
}

static int ip_start(const uint8_t *f, size_t len, int tap, int *ver) {
    size_t off = tap ? 14 : 0;
    if (tap && (len < 14 || (ld16(f + 12) != 0x0800 && ld16(f + 12) != 0x86DD)))
        return -1;
    if (len < off + 40)
        return -1;
    *ver = f[off] >> 4;
    return (*ver == 4 || *ver == 6) ? (int)off : -1;
}

/* Make the frame a TSO frame as a device hands it over; returns the TCP offset or 0. */
static size_t make_consistent(uint8_t *f, size_t len, int tap, uint8_t *vh) {
    int ver;
    int off = ip_start(f, len, tap, &ver);
    if (off < 0)
        return 0;
    uint8_t *ip = f + off;
    size_t l4;
    if (ver == 4) {
        ip[0] = 0x45;
        ip[9] = 6;
        st16(ip + 2, (uint32_t)(len - (size_t)off));
        st16(ip + 6, ld16(ip + 6) & 0x4000);
        st16(ip + 10, 0);
        st16(ip + 10, (uint16_t)~fold(sum16(ip, 20, 0)));
        l4 = (size_t)off + 20;
    } else {
        ip[6] = 6;
        st16(ip + 4, (uint32_t)(len - (size_t)off - 40));
        l4 = (size_t)off + 40;
    }
    if (l4 + 20 > len)
        return 0;
    if ((f[l4 + 12] >> 4) < 5)
        f[l4 + 12] = (uint8_t)(5 << 4 | (f[l4 + 12] & 15));
    st16(f + l4 + 16, fold(pseudo(ip, ver, len - l4)));
    vh[0] = 1;
    vh[1] = (uint8_t)((vh[1] & 0x80) | (ver == 4 ? 1 : 4));
    vh[6] = (uint8_t)l4;
    vh[7] = (uint8_t)(l4 >> 8);
    vh[8] = 16;
    vh[9] = 0;
    return l4;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 11)
        return 0;
    uint8_t sel = data[0];
    int tap = !(sel & 1);
    uint8_t vh[12] = {0};
    memcpy(vh, data + 1, 10);
    size_t len = size - 11;
    if (len > FRAME_MAX)
        len = FRAME_MAX;
    memcpy(frame, data + 11, len);
    size_t l4 = (sel & 2) ? make_consistent(frame, len, tap, vh) : 0;
    /* Headers that fit: the segmenter refuses more than 192 bytes of them. */
    int n = gdp_test_seg(frame, len, tap ? 0 : 1, vh, segs, sizeof(segs), seg_lens, MAX_SEGS);
    CHECK(n >= -2);
    if (n <= 0)
        return 0;
#ifdef GDP_FUZZ_SELFTEST
    if (memcmp(data + 11, "SEG!", 4) == 0)
        n++; /* a planted miscount the check must catch */
#endif
    int ver;
    int off = ip_start(frame, len, tap, &ver);
    CHECK(off >= 0);
    size_t cstart = (size_t)vh[6] | (size_t)vh[7] << 8;
    size_t mss = (size_t)vh[4] | (size_t)vh[5] << 8;
    size_t hdrs = cstart + (size_t)(frame[cstart + 12] >> 4) * 4;
    CHECK(hdrs <= len && mss > 0);
    size_t expect = hdrs == len ? 0 : (len - hdrs + mss - 1) / mss;
    CHECK((size_t)n == expect);
    size_t at = 0, pay = hdrs;
    uint32_t seq = ld32(frame + cstart + 4);
    for (int i = 0; i < n; i++) {
        const uint8_t *s = segs + at;
        size_t slen = seg_lens[i];
        at += slen;
        CHECK(slen > hdrs && slen - hdrs <= mss);
        CHECK(!memcmp(s + hdrs, frame + pay, slen - hdrs));
        pay += slen - hdrs;
        CHECK(ld32(s + cstart + 4) == seq + (uint32_t)(pay - hdrs - (slen - hdrs)));
        const uint8_t *ip = s + off;
        if (ver == 4)
            CHECK(ld16(ip + 2) == slen - (size_t)off);
        else
            CHECK(ld16(ip + 4) == slen - (size_t)off - 40);
        CHECK(fold(sum16(s + cstart, slen - cstart, pseudo(ip, ver, slen - cstart))) == 0xFFFF);
    }
    CHECK(pay == len);
    if (!l4 || n > MAX_SEGS)
        return 0;
    /* Coalesced again, the payload comes back whole, in order. */
    int m = gdp_test_gro(segs, seg_lens, (uint32_t)n, tap ? 0 : 1, 0, NULL, 0, back, sizeof(back),
                         back_lens, MAX_SEGS);
    CHECK(m > 0);
    size_t bat = 0, got = hdrs;
    for (int i = 0; i < m; i++) {
        const uint8_t *o = back + bat + 12;
        size_t olen = back_lens[i] - 12;
        bat += back_lens[i];
        CHECK(olen > hdrs && got + olen - hdrs <= len);
        CHECK(!memcmp(o + hdrs, frame + got, olen - hdrs));
        got += olen - hdrs;
    }
    CHECK(got == len);
    return 0;
}
