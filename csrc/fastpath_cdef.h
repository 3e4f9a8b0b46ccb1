/* The declarations cffi reads (cdef only: no includes, no expressions in macros).
 * They must match the real headers in this folder; the compiler checks that when
 * the module is built, since build_fastpath.py compiles them against those headers. */

/* ---- codec (geneve.h) ---- */
#define GDP_MAX_OPTIONS 63
#define GDP_MAX_HEADER_LEN 260
#define GDP_E_TRUNCATED -1
#define GDP_E_BAD_VERSION -2
#define GDP_E_OPTIONS_TRUNCATED -3
#define GDP_E_OPTION_OVERRUNS -4
#define GDP_E_BAD_VNI -10
#define GDP_E_BAD_OPTIONS -11
#define GDP_E_NO_SPACE -12

struct gdp_option {
    uint16_t opt_class;
    uint8_t type;
    uint8_t data_len;
    uint16_t data_offset;
};

struct gdp_header {
    uint8_t version;
    uint8_t opt_len;
    uint8_t oam;
    uint8_t critical;
    uint16_t protocol;
    uint16_t n_options;
    uint32_t vni;
    uint32_t payload_offset;
    struct gdp_option options[63];
};

int gdp_decode(const uint8_t *buf, size_t len, struct gdp_header *out);
int gdp_encode(uint32_t vni, uint16_t protocol, int oam, const uint8_t *opts,
               size_t opts_len, uint8_t *out, size_t cap);
int gdp_options_check(const uint8_t *opts, size_t opts_len);
size_t gdp_decode_batch(const uint8_t *const *bufs, const size_t *lens, size_t n,
                        struct gdp_header *outs, int *rcs);
size_t gdp_encode_batch(const uint32_t *vnis, uint16_t protocol, int oam,
                        const uint8_t *opts, size_t opts_len, uint8_t *const *outs,
                        size_t cap, size_t n, int *rcs);
const char *gdp_build_id(void);
