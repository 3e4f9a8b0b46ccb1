/* RFC 8926 GENEVE header codec: the C twin of geneve_dp/codec.py. */
#ifndef GDP_GENEVE_H
#define GDP_GENEVE_H

#include <stddef.h>
#include <stdint.h>

#define GDP_BASE_HEADER_LEN 8
#define GDP_MAX_OPTIONS 63          /* 252 bytes of options, 4 bytes each at least */
#define GDP_MAX_OPTIONS_LEN 252
#define GDP_MAX_HEADER_LEN 260
#define GDP_MAX_OPTION_DATA_LEN 124
#define GDP_MAX_VNI 0xFFFFFF

/* Decode errors, in the order the checks run (codec.DECODE_REASONS). */
#define GDP_E_TRUNCATED (-1)
#define GDP_E_BAD_VERSION (-2)
#define GDP_E_OPTIONS_TRUNCATED (-3)
#define GDP_E_OPTION_OVERRUNS (-4)
/* Encode errors. */
#define GDP_E_BAD_VNI (-10)
#define GDP_E_BAD_OPTIONS (-11)
#define GDP_E_NO_SPACE (-12)

struct gdp_option {
    uint16_t opt_class;
    uint8_t type;
    uint8_t data_len;     /* bytes, a multiple of 4, at most 124 */
    uint16_t data_offset; /* from the start of the GENEVE header */
};

struct gdp_header {
    uint8_t version;
    uint8_t opt_len; /* 4-byte words */
    uint8_t oam;
    uint8_t critical;
    uint16_t protocol;
    uint16_t n_options;
    uint32_t vni;
    uint32_t payload_offset;
    struct gdp_option options[GDP_MAX_OPTIONS];
};

/* Decode the header at buf[0..len). Returns the payload offset (>= 8) or a
 * GDP_E_* code. Reads nothing past buf + len. */
int gdp_decode(const uint8_t *buf, size_t len, struct gdp_header *out);

/* Write a header for ``opts`` (an already laid-out option area of ``opts_len``
 * bytes) into out[0..cap). The C bit is derived from the options. Returns the header
 * length or a GDP_E_* code. */
int gdp_encode(uint32_t vni, uint16_t protocol, int oam, const uint8_t *opts,
               size_t opts_len, uint8_t *out, size_t cap);

/* Check that an option area walks exactly; returns 1 if some option is critical,
 * 0 if none is, or GDP_E_BAD_OPTIONS. */
int gdp_options_check(const uint8_t *opts, size_t opts_len);

/* Batches: one call for n buffers; rcs[i] gets each result as above. Returns how
 * many succeeded. */
size_t gdp_decode_batch(const uint8_t *const *bufs, const size_t *lens, size_t n,
                        struct gdp_header *outs, int *rcs);
size_t gdp_encode_batch(const uint32_t *vnis, uint16_t protocol, int oam,
                        const uint8_t *opts, size_t opts_len, uint8_t *const *outs,
                        size_t cap, size_t n, int *rcs);

/* Identifies the C sources this module was built from (see fastpath.py). */
const char *gdp_build_id(void);

#endif
