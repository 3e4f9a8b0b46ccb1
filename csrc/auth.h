/* Authenticated tunnels: the GENEVE integrity option (geneve_dp/auth/ is the Python
 * twin and README "Authenticated tunnels" the user-facing description).
 *
 * Wire format of the option (class configurable in 0xFFF0-0xFFFF, type
 * GDP_AUTH_OPT_TYPE with the critical bit, GDP_AUTH_DATA_LEN bytes of data):
 *
 *   data[0]      key ID
 *   data[1..3]   reserved, sent as zero (covered by the MAC, not checked)
 *   data[4..11]  sender salt, 64 bits: picked at random when a key ring is loaded
 *   data[12..19] sequence number, 64 bits, big-endian
 *   data[20..35] MAC, 16 bytes
 *
 * MAC: AES-256-GCM (libsodium) with an empty message, i.e. GMAC, over the GENEVE
 * header (every option, this one with its MAC field zeroed) and the whole inner frame
 * as associated data. Its key is derived per sender salt from the master key of the
 * key ID (crypto_kdf_derive_from_key, context GDP_AUTH_KDF_CTX, subkey ID = salt), and
 * its nonce is the sequence number (4 zero bytes, then the 8 bytes big-endian). A
 * nonce then repeats under one derived key only if the same sender reused a sequence
 * number, which it never does (one atomic counter per tunnel), or if two senders drew
 * the same 64-bit salt.
 *
 * Anti-replay: a sliding window of GDP_AUTH_WINDOW sequence numbers per (tunnel, key)
 * as RFC 6479 (a ring of 64-bit words, whole words cleared as the window moves). The
 * sequence number is a clock: a sender moves its counter up to the realtime clock
 * (microseconds << GDP_AUTH_SEQ_SHIFT) whenever it goes to send (gdp_auth_tick), so
 * it continues across the sender's restarts (a receiver needs no per-salt window) and
 * no packet carries a number below the time it was sent at. A receiver refuses every
 * number below its own start time less GDP_AUTH_SLACK_US (the floor): what was sent
 * before a receiver restarted cannot be replayed to the fresh, empty window.
 *
 * Memory: the caller allocates every struct (sizes from the *_size functions, 16-byte
 * aligned). A key ring is immutable once published with gdp_auth_set_ring; a reload
 * publishes a new one and the caller keeps the old one alive for a while. */
#ifndef GDP_AUTH_H
#define GDP_AUTH_H

#include <stddef.h>
#include <stdint.h>

/* Derivation context of the per-sender MAC keys (a string: outside the cdef part). */
#define GDP_AUTH_KDF_CTX "gdpauth1"

/* cdef-begin: up to cdef-end, build_fastpath.py hands these lines to cffi as they are,
 * so they keep to what its cdef accepts (a macro is a plain integer, no includes). */
#define GDP_AUTH_OPT_TYPE 0x81 /* critical bit + 1 */
#define GDP_AUTH_DATA_LEN 36
#define GDP_AUTH_OPT_LEN 40 /* with the 4-byte option header */
#define GDP_AUTH_KEY_LEN 32
#define GDP_AUTH_TAG_LEN 16
#define GDP_AUTH_MAX_KEYS 2
#define GDP_AUTH_WINDOW 8192 /* sequence numbers a packet may lag the newest one */
#define GDP_AUTH_SEQ_SHIFT 12 /* a sender starts at (unix time in us) << this */
#define GDP_AUTH_SLACK_US 2000000 /* how far a sender's clock may lag a receiver's */
/* Offsets inside the option (from its 4-byte header). */
#define GDP_AUTH_OFF_KEY_ID 4
#define GDP_AUTH_OFF_SALT 8
#define GDP_AUTH_OFF_SEQ 16
#define GDP_AUTH_OFF_TAG 24

/* Receive check results, in the order the checks run. */
#define GDP_AUTH_OK 0
#define GDP_AUTH_MISSING 1     /* no integrity option of this class and type */
#define GDP_AUTH_UNKNOWN_KEY 2 /* its key ID is not in the key ring */
#define GDP_AUTH_BAD_MAC 3     /* the MAC does not verify (or the option is malformed) */
#define GDP_AUTH_REPLAYED 4    /* sequence number seen already, or older than the window */

/* Setup errors. */
#define GDP_AUTH_E_INIT -30   /* libsodium did not initialise */
#define GDP_AUTH_E_NO_AES -31 /* no AES-NI/PCLMUL: libsodium's AES-GCM is unavailable */
#define GDP_AUTH_E_ARGS -32   /* bad key count, send index or option class */
#define GDP_AUTH_E_NO_KEY -33 /* signing with a ring that has no send key */

struct gdp_auth;       /* per tunnel: current ring, sequence counter, windows */
struct gdp_auth_ring;  /* immutable key set, sender state */
struct gdp_auth_cache; /* per receiving thread: derived keys of recent senders */

/* Room an engine reserves for its receive thread's cache (auth.c checks it fits). */
#define GDP_AUTH_CACHE_BYTES 2304

size_t gdp_auth_size(void);
size_t gdp_auth_ring_size(void);
size_t gdp_auth_cache_size(void);

/* Check that the primitive is usable on this machine (0 or GDP_AUTH_E_*). */
int gdp_auth_available(void);

/* A tunnel's state: option class, the first sequence number to send and the lowest
 * one to accept (the floor: this receiver's start, less the slack, as a sequence
 * number; 0 accepts any). */
int gdp_auth_init(struct gdp_auth *a, uint16_t opt_class, uint64_t first_seq, uint64_t floor);
void gdp_auth_destroy(struct gdp_auth *a);

/* A key ring of n keys (ids[i], keys[i*32..]); ``slots[i]`` is the window slot
 * (0..3) of each key ID, kept across reloads for IDs that stay so that their windows
 * carry on; ``send`` indexes the key to sign with (-1: receive only). ``salt`` is this
 * sender's salt for the ring. */
int gdp_auth_ring_init(struct gdp_auth_ring *r, const uint8_t *ids, const uint8_t *keys,
                       const uint8_t *slots, uint32_t n, int send, uint64_t salt);
/* Publish a ring (atomic for the engine threads); a window slot that the new ring
 * gives to a key ID it did not have before is cleared first. */
void gdp_auth_set_ring(struct gdp_auth *a, struct gdp_auth_ring *r, int reset_slot_mask);

/* Sign the packet geneve[0..len): header with the option at byte ``opt_off`` (its
 * 4-byte option header already written) followed by the inner frame. */
int gdp_auth_sign(struct gdp_auth *a, uint8_t *geneve, size_t len, size_t opt_off);
/* The same for a packet in two pieces (header, rest): both are copied into
 * ``scratch`` (cap >= len1 + len2) to be MACed; the option is written in ``geneve``. */
int gdp_auth_sign2(struct gdp_auth *a, uint8_t *geneve, size_t len1, const uint8_t *rest,
                   size_t len2, size_t opt_off, uint8_t *scratch, size_t cap);

/* Receive check of geneve[0..len) (a header that gdp_decode accepted, plus the inner
 * frame): GDP_AUTH_OK with *opt_off set to the option's byte offset, or the first
 * failing check. The MAC field is zeroed while the MAC is computed and put back. */
int gdp_auth_verify(struct gdp_auth *a, struct gdp_auth_cache *c, uint8_t *geneve,
                    size_t len, size_t *opt_off);

/* The offset of the first option of this class and type in the header at
 * geneve[0..len), or -1. */
long gdp_auth_find(const uint8_t *geneve, size_t len, uint16_t opt_class, uint8_t type);

/* The next sequence number this tunnel will send (for status and tests). */
uint64_t gdp_auth_next_seq(const struct gdp_auth *a);
/* Move the send counter up to ``now_seq`` if it is behind (never down). */
void gdp_auth_tick(struct gdp_auth *a, uint64_t now_seq);
/* The realtime clock as a sequence number: (unix time in us) << GDP_AUTH_SEQ_SHIFT. */
uint64_t gdp_auth_clock_seq(void);
/* cdef-end */

#endif
