/* The declarations cffi reads (cdef only: no includes, no expressions in macros).
 * They must match the real headers in this folder; the compiler checks that when
 * the module is built, since build_fastpath.py compiles them against those headers.
 * Headers whose declarations are cdef-clean as written are not copied here: their
 * cdef-begin/cdef-end part is appended by build_fastpath.py (testpoints.h, auth.h). */

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

/* ---- tunnel endpoint engine (engine.h) ----
 * Structs list only the fields Python touches; "...;" and "[...]" leave the layout
 * and the lengths to the compiler. Drop reasons and counters are not repeated here:
 * Python reads their names through gdp_drop_name and gdp_counter_name (counters.h). */
#define GDP_HEADROOM 320
#define GDP_FRAME_MAX 65535
#define GDP_BATCH 32
#define GDP_VNET_LEN 12
#define GDP_MAX_TUNNELS 255
#define GDP_OPTSEEN_SLOTS 32
#define GDP_MODE_TAP 0
#define GDP_MODE_TUN 1
#define GDP_DF_UNSET 0
#define GDP_DF_SET 1
#define GDP_DF_INHERIT 2
#define GDP_TOS_UNSET 0
#define GDP_TOS_FIXED 1
#define GDP_TOS_INHERIT 2
#define GDP_DIR_RX 1
#define GDP_DIR_TX 2
#define GDP_DROP_COUNT ...
#define GDP_COUNTER_COUNT ...
#define GDP_E_ENGINE_TOO_MANY -20
#define GDP_E_ENGINE_BUFFER -21
#define GDP_E_ENGINE_CONFIG -22
#define GDP_E_ENGINE_HEADER -23

struct gdp_optseen {
    uint16_t opt_class;
    uint8_t type;
    uint8_t used;
    uint64_t count;
    ...;
};

struct gdp_counters {
    uint64_t drops[...];
    uint64_t options_other;
    struct gdp_optseen options_seen[...];
    ...;
};

struct gdp_reflect_entry {
    ...;
};

struct gdp_auth;
struct gdp_tunnel {
    int dev_fd;
    int mode;
    int family;
    uint32_t vni;
    uint16_t port;
    uint8_t remote[16];
    uint8_t local[16];
    uint8_t mac[6];
    uint8_t ttl;
    uint8_t tos;
    int tos_set;
    int df;
    int udp_csum;
    uint32_t underlay_mtu;
    uint8_t opts[...];
    uint32_t opts_len;
    struct gdp_reflect_entry *reflect;
    uint32_t reflect_slots;
    int vnet_hdr;
    int rx_uso;
    int gso_fds[8];
    uint16_t gso_ports[8];
    uint32_t n_gso;
    int raw_fd;
    int gso_nocsum;
    int inject;
    int inj_fd;
    uint8_t inj_mac[6];
    uint32_t dev_mtu;
    char underlay_ifname[16];
    struct gdp_auth *auth;
    struct gdp_counters counters;
    ...;
};

struct gdp_sock_stats {
    uint64_t drops[...];
    uint64_t rx_queue_overflow;
    uint64_t rx_packets;
    uint64_t busy_poll_hits_rx;
    uint64_t busy_poll_hits_tx;
    ...;
};

struct gdp_engine_config {
    int family;
    int udp_fd;
    int raw_fd;
    int stop_fd;
    int control_fd;
    uint16_t sport_min;
    uint16_t sport_max;
    uint32_t hash_seed;
    uint32_t ip_id_start;
    uint32_t control_tag;
    uint32_t busy_poll_ns;
    int kick_rx_fd;
    int kick_tx_fd;
    ...;
};

struct gdp_engine;

size_t gdp_engine_size(void);
size_t gdp_engine_buffers_size(void);
int gdp_tunnel_prepare(struct gdp_tunnel *t);
int gdp_engine_init(struct gdp_engine *e, const struct gdp_engine_config *cfg,
                    struct gdp_tunnel *tunnels, uint32_t n, uint8_t *bufs,
                    size_t bufs_len, struct gdp_sock_stats *stats);
int gdp_engine_run(struct gdp_engine *e, int dirs);
const char *gdp_drop_name(unsigned i);
int gdp_drop_on_socket(unsigned i);
const char *gdp_counter_name(unsigned i);
uint64_t gdp_counter_get(const struct gdp_counters *c, unsigned i);
uint16_t gdp_inet_csum(const uint8_t *buf, size_t len);
uint32_t gdp_flow_hash(const uint8_t *frame, size_t len, int mode, uint32_t seed);
