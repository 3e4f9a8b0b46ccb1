/* Byte-order helpers and a bounds-checked read cursor.
 *
 * Every multi-byte field is read and written through these helpers, never through a
 * struct overlay, so the code is independent of host endianness and alignment. */
#ifndef GDP_BYTES_H
#define GDP_BYTES_H

#include <stddef.h>
#include <stdint.h>

static inline uint16_t gdp_load16(const uint8_t *p) {
    return (uint16_t)((uint16_t)p[0] << 8 | p[1]);
}

static inline uint32_t gdp_load24(const uint8_t *p) {
    return (uint32_t)p[0] << 16 | (uint32_t)p[1] << 8 | p[2];
}

static inline uint32_t gdp_load32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline void gdp_store16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline void gdp_store32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* A read cursor: ``pos`` only advances after a check against ``end``. */
struct gdp_cursor {
    const uint8_t *pos;
    const uint8_t *end;
};

static inline size_t gdp_cursor_left(const struct gdp_cursor *c) {
    return (size_t)(c->end - c->pos);
}

static inline int gdp_cursor_has(const struct gdp_cursor *c, size_t n) {
    return gdp_cursor_left(c) >= n;
}

#endif
