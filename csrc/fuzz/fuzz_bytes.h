/* Byte order and Internet checksum helpers the fuzz harnesses check packets with,
 * written apart from the engine's own (inner.c) so that a bug there is not shared. */
#ifndef GDP_FUZZ_BYTES_H
#define GDP_FUZZ_BYTES_H

#include <stddef.h>
#include <stdint.h>

static inline uint32_t ld16(const uint8_t *p) { return (uint32_t)p[0] << 8 | p[1]; }
static inline uint32_t ld32(const uint8_t *p) { return ld16(p) << 16 | ld16(p + 2); }
static inline uint32_t le16(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8; }
static inline void st16(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

/* One's complement sum of p[0..n) as big-endian 16-bit words, added to s. */
static inline uint32_t sum16(const uint8_t *p, size_t n, uint32_t s) {
    for (size_t i = 0; i + 1 < n; i += 2)
        s += ld16(p + i);
    if (n & 1)
        s += (uint32_t)p[n - 1] << 8;
    return s;
}

static inline uint16_t fold(uint32_t s) {
    while (s >> 16)
        s = (s & 0xFFFF) + (s >> 16);
    return (uint16_t)s;
}

#endif
