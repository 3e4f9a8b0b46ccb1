/* libFuzzer harness for the option walkers of csrc/codec.c: the TLV walk inside
 * gdp_decode and gdp_options_check.
 *
 * fuzz_decode.c feeds whole packets, so most inputs stop at the version or Opt Len
 * checks and few reach the walk. Here every input is an option area: the first byte
 * picks the header around it (Opt Len: exact, larger or smaller than the area; C and
 * O bits), the rest is the TLVs, followed by a few payload bytes. So the walk runs on
 * every execution, including areas whose Opt Len overruns the packet and options that
 * overrun Opt Len. For each input it:
 *   1. decodes the built packet from an exactly sized heap block (ASan sees overreads)
 *      and compares it with a walk of its own (byte offsets, no cursor): same return
 *      code, same options with the same offsets, and the same verdict on critical
 *      options that the engine bases its drop on (a type with the high bit);
 *   2. runs gdp_options_check on the raw area and on the decoded area and compares
 *      with the same walk's rules for the encoder (whole words, <= 252 bytes, no
 *      reserved length bits, exact walk);
 *   3. for an area the encoder accepts, encodes it and requires the bytes and the
 *      decoded options to come back unchanged, with the C bit derived from the types.
 * With -DGDP_FUZZ_SELFTEST an area starting "WLK!" makes the reference walk miscount:
 * the test suite uses that build to prove the cross-check fires. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "geneve.h"

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "fuzz_options: check failed at line %d: %s\n", __LINE__, #cond); \
            abort();                                                                     \
        }                                                                                \
    } while (0)

#define PAYLOAD 6

struct walk {
    int rc;
    unsigned count, critical;
    unsigned offset[GDP_MAX_OPTIONS], length[GDP_MAX_OPTIONS];
};

/* The decoder's rules for the area p[first..first+words*4) of a packet of n bytes. */
static void walk_packet(const uint8_t *p, size_t n, size_t words, struct walk *w) {
    size_t first = GDP_BASE_HEADER_LEN, stop = first + words * 4;
    memset(w, 0, sizeof *w);
    if (stop > n) {
        w->rc = GDP_E_OPTIONS_TRUNCATED;
        return;
    }
    size_t at = first;
    while (stop - at >= 4) {
        size_t body = (size_t)(p[at + 3] & 31) << 2;
        if (at + 4 + body > stop) {
            w->rc = GDP_E_OPTION_OVERRUNS;
            return;
        }
        w->offset[w->count] = (unsigned)(at + 4);
        w->length[w->count] = (unsigned)body;
        w->count++;
        if (p[at + 2] & 0x80)
            w->critical = 1;
        at += 4 + body;
    }
    w->rc = (int)stop;
}

/* The encoder's rules for a bare area: 1 critical, 0 not, or GDP_E_BAD_OPTIONS. */
static int walk_area(const uint8_t *a, size_t n) {
    if (n % 4 != 0 || n > GDP_MAX_OPTIONS_LEN)
        return GDP_E_BAD_OPTIONS;
    int critical = 0;
    size_t at = 0;
    while (at < n) {
        if (a[at + 3] & 0xE0) /* reserved length bits */
            return GDP_E_BAD_OPTIONS;
        size_t body = (size_t)a[at + 3] << 2;
        if (at + 4 + body > n)
            return GDP_E_BAD_OPTIONS;
        critical |= a[at + 2] >> 7;
        at += 4 + body;
    }
    return critical;
}

static uint8_t *heap_copy(const uint8_t *src, size_t n) {
    uint8_t *p = malloc(n ? n : 1);
    CHECK(p != NULL);
    if (n)
        memcpy(p, src, n);
    return p;
}

static struct gdp_header hdr, again;
static uint8_t pkt[GDP_BASE_HEADER_LEN + 4096 + PAYLOAD];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1 || size > 4096)
        return 0;
    const uint8_t sel = data[0];
    const uint8_t *area = data + 1;
    size_t area_len = size - 1;

    /* Opt Len: the area's whole words (capped at 63), or off by a few either way. */
    size_t exact = area_len / 4 > 63 ? 63 : area_len / 4;
    int delta = (int)(sel & 7) - 3;
    long words = (long)exact + delta;
    if (words < 0)
        words = 0;
    if (words > 63)
        words = 63;
    size_t n = GDP_BASE_HEADER_LEN + area_len + ((sel & 8) ? PAYLOAD : 0);
    pkt[0] = (uint8_t)words;
    pkt[1] = (uint8_t)(((sel & 0x10) ? 0x80 : 0) | ((sel & 0x20) ? 0x40 : 0));
    pkt[2] = 0x65;
    pkt[3] = 0x58;
    pkt[4] = 0x00;
    pkt[5] = 0x03;
    pkt[6] = 0xE8;
    pkt[7] = 0;
    memcpy(pkt + GDP_BASE_HEADER_LEN, area, area_len);
    memset(pkt + GDP_BASE_HEADER_LEN + area_len, 0xAB, n - GDP_BASE_HEADER_LEN - area_len);

    /* 1. the walk inside gdp_decode */
    uint8_t *copy = heap_copy(pkt, n);
    int rc = gdp_decode(copy, n, &hdr);
    free(copy);
    struct walk ref;
    walk_packet(pkt, n, (size_t)words, &ref);
#ifdef GDP_FUZZ_SELFTEST
    if (area_len >= 4 && memcmp(area, "WLK!", 4) == 0)
        ref.count++; /* a planted disagreement the cross-check must catch */
#endif
    CHECK(rc == ref.rc);
    if (rc >= 0) {
        CHECK(hdr.n_options == ref.count);
        CHECK(hdr.opt_len == (unsigned)words);
        unsigned critical = 0;
        for (unsigned i = 0; i < hdr.n_options; i++) {
            CHECK(hdr.options[i].data_offset == ref.offset[i]);
            CHECK(hdr.options[i].data_len == ref.length[i]);
            CHECK(hdr.options[i].opt_class == (unsigned)(pkt[ref.offset[i] - 4] << 8 |
                                                         pkt[ref.offset[i] - 3]));
            CHECK(hdr.options[i].type == pkt[ref.offset[i] - 2]);
            critical |= (hdr.options[i].type & 0x80) != 0;
        }
        CHECK(critical == ref.critical);
        CHECK(hdr.critical == ((pkt[1] & 0x40) != 0));
        CHECK(hdr.oam == ((pkt[1] & 0x80) != 0));
    }

    /* 2. gdp_options_check, on the raw area and on what the decoder delimited */
    uint8_t *raw = heap_copy(area, area_len);
    CHECK(gdp_options_check(raw, area_len) == walk_area(area, area_len));
    free(raw);
    if (rc < 0)
        return 0;
    size_t opts_len = (size_t)words * 4;
    const uint8_t *opts = pkt + GDP_BASE_HEADER_LEN;
    int crit = gdp_options_check(opts, opts_len);
    CHECK(crit == walk_area(opts, opts_len));
    if (crit < 0)
        return 0;
    CHECK((unsigned)crit == ref.critical);

    /* 3. encode and decode again */
    uint8_t out[GDP_MAX_HEADER_LEN];
    int erc = gdp_encode(hdr.vni, hdr.protocol, hdr.oam, opts, opts_len, out, sizeof out);
    CHECK(erc == rc);
    CHECK(memcmp(out + GDP_BASE_HEADER_LEN, opts, opts_len) == 0);
    CHECK(((out[1] & 0x40) != 0) == (crit == 1));
    uint8_t *enc = heap_copy(out, (size_t)erc);
    CHECK(gdp_decode(enc, (size_t)erc, &again) == erc);
    free(enc);
    CHECK(again.n_options == hdr.n_options && again.critical == (unsigned)crit);
    for (unsigned i = 0; i < hdr.n_options; i++) {
        CHECK(again.options[i].data_offset == hdr.options[i].data_offset);
        CHECK(again.options[i].data_len == hdr.options[i].data_len);
        CHECK(again.options[i].type == hdr.options[i].type);
    }
    return 0;
}
