/* libFuzzer harness for the authenticated-tunnel receive check (csrc/auth.c).
 *
 * Built by csrc/fuzz/build.sh (ASan + UBSan, linked with libsodium). Every input is a
 * GENEVE packet (header + inner frame) as a peer could send it. For each input:
 *   1. gdp_auth_find must agree with an independent walk of the option area;
 *   2. gdp_auth_verify on an exactly sized heap copy must return a known result in
 *      the order of the checks (no option -> MISSING, an option of the wrong size ->
 *      BAD_MAC, a key ID not in the ring -> UNKNOWN_KEY), must leave the packet's bytes as they were, and may
 *      return OK only where the option is (it cannot: no input carries a valid MAC,
 *      so OK aborts);
 *   3. when the input holds an integrity option of the right size, the harness signs
 *      a copy with gdp_auth_sign: that copy must verify, must then be refused as a
 *      replay, and a copy with one bit flipped (chosen from the input) anywhere must be
 *      refused.
 * With -DGDP_FUZZ_SELFTEST an input ending in "AUTH!" makes the harness accept
 * a flipped copy, so the suite can prove the check fires. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "auth.h"

#define CLASS 0xFFF0

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "fuzz_auth: check failed at line %d: %s\n", __LINE__, #cond); \
            abort();                                                                  \
        }                                                                             \
    } while (0)

static struct gdp_auth *sender, *receiver;
static struct gdp_auth_cache *cache;

static void *zalloc(size_t n) {
    void *p = aligned_alloc(64, (n + 63) / 64 * 64);
    CHECK(p != NULL);
    memset(p, 0, n);
    return p;
}

static void setup(void) {
    if (sender)
        return;
    static const uint8_t ids[2] = {1, 7}, slots[2] = {0, 1};
    uint8_t keys[64];
    for (int i = 0; i < 64; i++)
        keys[i] = (uint8_t)(i * 37 + 11);
    sender = zalloc(gdp_auth_size());
    receiver = zalloc(gdp_auth_size());
    cache = zalloc(gdp_auth_cache_size());
    CHECK(gdp_auth_init(sender, CLASS, 1000, 0) == 0);
    CHECK(gdp_auth_init(receiver, CLASS, 1, 0) == 0);
    struct gdp_auth_ring *rs = zalloc(gdp_auth_ring_size());
    struct gdp_auth_ring *rr = zalloc(gdp_auth_ring_size());
    CHECK(gdp_auth_ring_init(rs, ids, keys, slots, 2, 1, 0x1234) == 0);
    CHECK(gdp_auth_ring_init(rr, ids, keys, slots, 2, 0, 0x9999) == 0);
    gdp_auth_set_ring(sender, rs, 3);
    gdp_auth_set_ring(receiver, rr, 3);
}

/* The independent walk: indexes, no early exit other than the RFC's rules. */
static long ref_find(const uint8_t *p, size_t len) {
    if (len < 8)
        return -1;
    size_t area = (size_t)(p[0] & 0x3F) * 4;
    if (8 + area > len)
        return -1;
    size_t i = 0;
    while (i + 4 <= area) {
        size_t olen = 4 + (size_t)(p[8 + i + 3] & 0x1F) * 4;
        if (i + olen > area)
            return -1;
        if (p[8 + i] == (CLASS >> 8) && p[8 + i + 1] == (CLASS & 0xFF) &&
            p[8 + i + 2] == GDP_AUTH_OPT_TYPE)
            return (long)(8 + i);
        i += olen;
    }
    return -1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    setup();
    uint8_t *pkt = malloc(size ? size : 1);
    CHECK(pkt != NULL);
    memcpy(pkt, data, size);

    long off = gdp_auth_find(pkt, size, CLASS, GDP_AUTH_OPT_TYPE);
    CHECK(off == ref_find(pkt, size));

    size_t got_off = 0;
    int rc = gdp_auth_verify(receiver, cache, pkt, size, &got_off);
    CHECK(memcmp(pkt, data, size) == 0);
    CHECK(rc >= GDP_AUTH_OK && rc <= GDP_AUTH_REPLAYED);
    CHECK(rc != GDP_AUTH_OK); /* nobody can forge a MAC, least of all a fuzzer */
    if (off < 0)
        CHECK(rc == GDP_AUTH_MISSING);
    else if ((pkt[off + 3] & 0x1F) * 4 != GDP_AUTH_DATA_LEN)
        CHECK(rc == GDP_AUTH_BAD_MAC); /* a malformed option: its key ID may be outside */
    else {
        uint8_t id = pkt[off + GDP_AUTH_OFF_KEY_ID];
        CHECK(rc != GDP_AUTH_MISSING);
        CHECK((id == 1 || id == 7) == (rc != GDP_AUTH_UNKNOWN_KEY));
    }

    if (off >= 0 && (pkt[off + 3] & 0x1F) * 4 == GDP_AUTH_DATA_LEN) {
        CHECK(gdp_auth_sign(sender, pkt, size, (size_t)off) == 0);
        uint8_t *flipped = malloc(size);
        CHECK(flipped != NULL);
        memcpy(flipped, pkt, size);
        CHECK(gdp_auth_verify(receiver, cache, pkt, size, &got_off) == GDP_AUTH_OK);
        CHECK(got_off == (size_t)off);
        CHECK(gdp_auth_verify(receiver, cache, pkt, size, &got_off) == GDP_AUTH_REPLAYED);
        uint32_t h = 2166136261u;
        for (size_t i = 0; i < size; i++)
            h = (h ^ data[i]) * 16777619u;
        size_t bit = h % (size * 8);
        flipped[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        int frc = gdp_auth_verify(receiver, cache, flipped, size, &got_off);
#ifdef GDP_FUZZ_SELFTEST
        if (size >= 5 && !memcmp(data + size - 5, "AUTH!", 5))
            frc = GDP_AUTH_OK;
#endif
        CHECK(frc != GDP_AUTH_OK);
        free(flipped);
    }
    free(pkt);
    return 0;
}
