/* libFuzzer harness for the C GENEVE decoder (csrc/codec.c).
 *
 * Built by csrc/fuzz/build.sh with clang -fsanitize=fuzzer,address,undefined. For every
 * input it:
 *   1. decodes it with gdp_decode from an exactly sized heap copy (ASan sees overreads);
 *   2. decodes it again with a second, independently written walk (indexes, no cursor)
 *      and requires the same return code and, on success, the same fields;
 *   3. checks the invariants of a successful decode (offsets inside the buffer, options
 *      contiguous and ending exactly at the payload);
 *   4. requires every shorter prefix that still holds the base header to fail with the
 *      right reason, and the batch entry point to agree with the single one;
 *   5. re-encodes a successful decode with gdp_encode and decodes that again;
 *   6. checks gdp_options_check on the raw input against an independent walk.
 * Any disagreement aborts, which libFuzzer reports as a crash with the input saved.
 *
 * With -DGDP_FUZZ_SELFTEST an input starting "OOB!" reads one byte past the buffer, one
 * starting "OVF!" overflows a signed int and one starting "\0\0DIF!" makes the reference
 * walk disagree: the test suite uses that build to prove the sanitizers and the
 * cross-check really fire. */
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "geneve.h"

#define CHECK(cond)                                                                    \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "fuzz_decode: check failed at line %d: %s\n", __LINE__, #cond); \
            abort();                                                                   \
        }                                                                              \
    } while (0)

/* ---- the independent reference walk -------------------------------------------------- */

struct ref_option {
    unsigned opt_class, type, data_len, data_offset;
};

struct ref_header {
    unsigned version, opt_len, oam, critical, protocol, vni, n_options, payload_offset;
    struct ref_option options[64];
};

static int ref_decode(const uint8_t *b, size_t n, struct ref_header *h) {
    if (n < 8)
        return GDP_E_TRUNCATED;
    h->version = b[0] / 64;
    if (h->version)
        return GDP_E_BAD_VERSION;
    h->opt_len = b[0] % 64;
    h->oam = b[1] / 128;
    h->critical = (b[1] / 64) % 2;
    h->protocol = b[2] * 256u + b[3];
    h->vni = b[4] * 65536u + b[5] * 256u + b[6];
    size_t end = 8 + 4 * (size_t)h->opt_len;
    if (end > n)
        return GDP_E_OPTIONS_TRUNCATED;
    h->n_options = 0;
    for (size_t i = 8; i < end;) {
        size_t len = 4 * (size_t)(b[i + 3] % 32);
        if (i + 4 + len > end)
            return GDP_E_OPTION_OVERRUNS;
        struct ref_option *o = &h->options[h->n_options++];
        o->opt_class = b[i] * 256u + b[i + 1];
        o->type = b[i + 2];
        o->data_len = (unsigned)len;
        o->data_offset = (unsigned)(i + 4);
        i += 4 + len;
    }
    h->payload_offset = (unsigned)end;
    return (int)end;
}

/* gdp_options_check's contract, walked independently: 1 if some option is critical, 0 if
 * none is, GDP_E_BAD_OPTIONS unless the area is whole words, at most 252 bytes, without
 * reserved bits, and walks exactly. */
static int ref_options_check(const uint8_t *b, size_t n) {
    if (n > GDP_MAX_OPTIONS_LEN || n % 4)
        return GDP_E_BAD_OPTIONS;
    int critical = 0;
    for (size_t i = 0; i < n;) {
        if (b[i + 3] >= 32 || i + 4 + 4 * (size_t)b[i + 3] > n)
            return GDP_E_BAD_OPTIONS;
        if (b[i + 2] >= 128)
            critical = 1;
        i += 4 + 4 * (size_t)b[i + 3];
    }
    return critical;
}

/* ---- checks ------------------------------------------------------------------------ */

static void same_fields(const struct gdp_header *h, const struct ref_header *r) {
    CHECK(h->version == r->version);
    CHECK(h->opt_len == r->opt_len);
    CHECK(h->oam == r->oam);
    CHECK(h->critical == r->critical);
    CHECK(h->protocol == r->protocol);
    CHECK(h->vni == r->vni);
    CHECK(h->n_options == r->n_options);
    CHECK(h->payload_offset == r->payload_offset);
    for (unsigned i = 0; i < r->n_options; i++) {
        CHECK(h->options[i].opt_class == r->options[i].opt_class);
        CHECK(h->options[i].type == r->options[i].type);
        CHECK(h->options[i].data_len == r->options[i].data_len);
        CHECK(h->options[i].data_offset == r->options[i].data_offset);
    }
}

static void invariants(const struct gdp_header *h, int rc, size_t size) {
    CHECK(rc >= GDP_BASE_HEADER_LEN && rc <= GDP_MAX_HEADER_LEN);
    CHECK((size_t)rc <= size);
    CHECK((unsigned)rc == h->payload_offset);
    CHECK(h->payload_offset == 8u + 4u * h->opt_len);
    CHECK(h->version == 0 && h->vni <= GDP_MAX_VNI);
    CHECK(h->n_options <= GDP_MAX_OPTIONS);
    unsigned pos = GDP_BASE_HEADER_LEN;
    for (unsigned i = 0; i < h->n_options; i++) {
        CHECK(h->options[i].data_offset == pos + 4);
        CHECK(h->options[i].data_len % 4 == 0);
        CHECK(h->options[i].data_len <= GDP_MAX_OPTION_DATA_LEN);
        pos += 4u + h->options[i].data_len;
    }
    CHECK(pos == h->payload_offset);
}

/* Decode data[0..n) from a heap block of exactly n bytes. */
static int decode_exact(const uint8_t *data, size_t n, struct gdp_header *out) {
    uint8_t *copy = malloc(n ? n : 1);
    CHECK(copy != NULL);
    if (n)
        memcpy(copy, data, n);
    int rc = gdp_decode(copy, n, out);
    free(copy);
    return rc;
}

static struct gdp_header hdr, hdr2, batch_out[2];
static struct ref_header ref;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
#ifdef GDP_FUZZ_SELFTEST
    if (size >= 4 && memcmp(data, "OOB!", 4) == 0) {
        volatile uint8_t past = data[size]; /* deliberate heap overread */
        (void)past;
    }
    if (size >= 4 && memcmp(data, "OVF!", 4) == 0) {
        volatile int big = INT_MAX;
        int sum = big + (int)size; /* deliberate signed overflow */
        CHECK(sum != 0);
    }
#endif
    /* The raw input as an option area, for the encoder's validation. */
    CHECK(gdp_options_check(data, size) == ref_options_check(data, size));

    int rc = decode_exact(data, size, &hdr);
    int ref_rc = ref_decode(data, size, &ref);
#ifdef GDP_FUZZ_SELFTEST
    if (size >= 8 && memcmp(data, "\0\0DIF!", 6) == 0)
        ref.vni ^= 1; /* a planted disagreement the cross-check must catch */
#endif
    CHECK(rc == ref_rc);
    CHECK(rc >= GDP_E_OPTION_OVERRUNS);

    /* The batch entry point gives the same answer for the same bytes. */
    const uint8_t *bufs[2] = {data, data};
    size_t lens[2] = {size, size};
    int rcs[2];
    size_t ok = gdp_decode_batch(bufs, lens, 2, batch_out, rcs);
    CHECK(rcs[0] == rc && rcs[1] == rc);
    CHECK(ok == (rc >= 0 ? 2u : 0u));

    if (rc < 0)
        return 0;
    same_fields(&hdr, &ref);
    invariants(&hdr, rc, size);

    /* Every cut inside the header fails, naming the right reason. */
    for (size_t cut = 0; cut < (size_t)rc; cut++) {
        int prc = decode_exact(data, cut, &hdr2);
        CHECK(prc == (cut < GDP_BASE_HEADER_LEN ? GDP_E_TRUNCATED : GDP_E_OPTIONS_TRUNCATED));
    }

    /* Re-encode: possible exactly when the option area has no reserved bits set. */
    const uint8_t *opts = data + GDP_BASE_HEADER_LEN;
    size_t opts_len = (size_t)rc - GDP_BASE_HEADER_LEN;
    int crit = gdp_options_check(opts, opts_len);
    int any_reserved = 0;
    for (unsigned i = 0; i < hdr.n_options; i++)
        any_reserved |= data[hdr.options[i].data_offset - 1] & 0xE0;
    CHECK((crit < 0) == (any_reserved != 0));
    if (crit < 0)
        return 0;
    int any_critical = 0;
    for (unsigned i = 0; i < hdr.n_options; i++)
        any_critical |= (hdr.options[i].type & 0x80) != 0;
    CHECK(crit == any_critical);

    uint8_t out[GDP_MAX_HEADER_LEN];
    int erc = gdp_encode(hdr.vni, hdr.protocol, hdr.oam, opts, opts_len, out, sizeof out);
    CHECK(erc == rc);
    CHECK(out[0] == data[0]);
    CHECK(out[1] == ((data[1] & 0x80) | (crit ? 0x40 : 0)));
    CHECK(memcmp(out + 2, data + 2, 5) == 0 && out[7] == 0);
    CHECK(memcmp(out + 8, opts, opts_len) == 0);
    CHECK(gdp_encode(hdr.vni, hdr.protocol, hdr.oam, opts, opts_len, out, (size_t)rc - 1) ==
          GDP_E_NO_SPACE);

    int rrc = decode_exact(out, (size_t)erc, &hdr2);
    CHECK(rrc == rc);
    hdr2.critical = hdr.critical; /* the one field encode derives instead of copying */
    CHECK(hdr2.n_options == hdr.n_options && hdr2.vni == hdr.vni && hdr2.oam == hdr.oam);
    CHECK(hdr2.protocol == hdr.protocol && hdr2.opt_len == hdr.opt_len);
    for (unsigned i = 0; i < hdr.n_options; i++) {
        CHECK(hdr2.options[i].opt_class == hdr.options[i].opt_class);
        CHECK(hdr2.options[i].type == hdr.options[i].type);
        CHECK(hdr2.options[i].data_len == hdr.options[i].data_len);
        CHECK(hdr2.options[i].data_offset == hdr.options[i].data_offset);
    }
    return 0;
}
