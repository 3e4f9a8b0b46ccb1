/* GENEVE header codec. Checks run in the order of codec.DECODE_REASONS so both
 * codecs name the same reason for the same bytes. */
#include "geneve.h"

#include <string.h>

#include "bytes.h"

int gdp_decode(const uint8_t *buf, size_t len, struct gdp_header *out) {
    struct gdp_cursor c = {buf, buf + len};

    if (!gdp_cursor_has(&c, GDP_BASE_HEADER_LEN))
        return GDP_E_TRUNCATED;
    out->version = c.pos[0] >> 6;
    if (out->version != 0)
        return GDP_E_BAD_VERSION;
    out->opt_len = c.pos[0] & 0x3F;
    out->oam = (c.pos[1] & 0x80) != 0;
    out->critical = (c.pos[1] & 0x40) != 0;
    out->protocol = gdp_load16(c.pos + 2);
    out->vni = gdp_load24(c.pos + 4);
    c.pos += GDP_BASE_HEADER_LEN;

    size_t opts_len = (size_t)out->opt_len * 4;
    if (!gdp_cursor_has(&c, opts_len))
        return GDP_E_OPTIONS_TRUNCATED;
    /* From here on the cursor covers only the option area. */
    c.end = c.pos + opts_len;
    out->n_options = 0;
    while (gdp_cursor_left(&c) >= 4) {
        size_t data_len = (size_t)(c.pos[3] & 0x1F) * 4;
        if (gdp_cursor_left(&c) - 4 < data_len)
            return GDP_E_OPTION_OVERRUNS;
        struct gdp_option *o = &out->options[out->n_options++];
        o->opt_class = gdp_load16(c.pos);
        o->type = c.pos[2];
        o->data_len = (uint8_t)data_len;
        o->data_offset = (uint16_t)(c.pos + 4 - buf);
        c.pos += 4 + data_len;
    }
    /* The area is whole words and so is every option: nothing can be left over. */
    out->payload_offset = (uint32_t)(GDP_BASE_HEADER_LEN + opts_len);
    return (int)out->payload_offset;
}

int gdp_options_check(const uint8_t *opts, size_t opts_len) {
    struct gdp_cursor c = {opts, opts + opts_len};
    int critical = 0;

    if (opts_len > GDP_MAX_OPTIONS_LEN || opts_len % 4)
        return GDP_E_BAD_OPTIONS;
    while (gdp_cursor_left(&c) >= 4) {
        size_t data_len = (size_t)(c.pos[3] & 0x1F) * 4;
        if ((c.pos[3] & 0xE0) || gdp_cursor_left(&c) - 4 < data_len)
            return GDP_E_BAD_OPTIONS;
        critical |= (c.pos[2] & 0x80) != 0;
        c.pos += 4 + data_len;
    }
    return critical;
}

int gdp_encode(uint32_t vni, uint16_t protocol, int oam, const uint8_t *opts,
               size_t opts_len, uint8_t *out, size_t cap) {
    if (vni > GDP_MAX_VNI)
        return GDP_E_BAD_VNI;
    int critical = gdp_options_check(opts, opts_len);
    if (critical < 0)
        return critical;
    size_t hlen = GDP_BASE_HEADER_LEN + opts_len;
    if (cap < hlen)
        return GDP_E_NO_SPACE;
    out[0] = (uint8_t)(opts_len / 4);
    out[1] = (uint8_t)((oam ? 0x80 : 0) | (critical ? 0x40 : 0));
    gdp_store16(out + 2, protocol);
    gdp_store32(out + 4, vni << 8);
    if (opts_len)
        memcpy(out + GDP_BASE_HEADER_LEN, opts, opts_len);
    return (int)hlen;
}

size_t gdp_decode_batch(const uint8_t *const *bufs, const size_t *lens, size_t n,
                        struct gdp_header *outs, int *rcs) {
    size_t ok = 0;
    for (size_t i = 0; i < n; i++) {
        rcs[i] = gdp_decode(bufs[i], lens[i], &outs[i]);
        ok += rcs[i] >= 0;
    }
    return ok;
}

size_t gdp_encode_batch(const uint32_t *vnis, uint16_t protocol, int oam,
                        const uint8_t *opts, size_t opts_len, uint8_t *const *outs,
                        size_t cap, size_t n, int *rcs) {
    size_t ok = 0;
    for (size_t i = 0; i < n; i++) {
        rcs[i] = gdp_encode(vnis[i], protocol, oam, opts, opts_len, outs[i], cap);
        ok += rcs[i] >= 0;
    }
    return ok;
}
