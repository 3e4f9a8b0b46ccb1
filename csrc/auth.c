/* Authenticated tunnels: signing, the receive check and the anti-replay window
 * (format and rules: auth.h). The cryptography is libsodium's; this file only lays
 * out what is MACed, keeps the windows and compares in constant time. */
#include "auth.h"

#include <pthread.h>
#include <sodium.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>

#include "bytes.h"
#include "geneve.h"

#define WINDOW_WORDS (GDP_AUTH_WINDOW / 64 + 1)
#define WINDOW_SLOTS 4 /* two live keys, and two for the keys the next ring brings */
#define CACHE_ENTRIES 4

static uint64_t load64(const uint8_t *p) {
    return (uint64_t)gdp_load32(p) << 32 | gdp_load32(p + 4);
}
static void store64(uint8_t *p, uint64_t v) {
    gdp_store32(p, (uint32_t)(v >> 32));
    gdp_store32(p + 4, (uint32_t)v);
}

struct window {
    pthread_mutex_t lock;
    uint64_t top; /* newest sequence number accepted */
    int used;
    uint64_t bits[WINDOW_WORDS]; /* bit (seq % 64) of word ((seq / 64) % WINDOW_WORDS) */
};

struct ring_key {
    uint8_t id;
    uint8_t slot;
    uint8_t master[GDP_AUTH_KEY_LEN];
};

struct gdp_auth_ring {
    crypto_aead_aes256gcm_state send_state; /* first: 16-byte aligned */
    uint64_t gen;                           /* unique per ring in this process */
    uint64_t salt;
    uint32_t n;
    int send;
    struct ring_key keys[GDP_AUTH_MAX_KEYS];
};

struct gdp_auth {
    _Atomic(struct gdp_auth_ring *) ring;
    _Atomic uint64_t next_seq;
    uint64_t floor; /* no sequence number below it is accepted */
    uint16_t opt_class;
    struct window win[WINDOW_SLOTS];
};

struct cache_entry {
    crypto_aead_aes256gcm_state state;
    uint64_t gen;
    uint64_t salt;
    uint8_t key_id;
    uint8_t used;
};

struct gdp_auth_cache {
    struct cache_entry e[CACHE_ENTRIES];
    uint32_t next;
};

_Static_assert(sizeof(struct gdp_auth_cache) <= GDP_AUTH_CACHE_BYTES, "engine room");

static _Atomic uint64_t ring_gen;

size_t gdp_auth_size(void) { return sizeof(struct gdp_auth); }
size_t gdp_auth_ring_size(void) { return sizeof(struct gdp_auth_ring); }
size_t gdp_auth_cache_size(void) { return sizeof(struct gdp_auth_cache); }

int gdp_auth_available(void) {
    if (sodium_init() < 0)
        return GDP_AUTH_E_INIT;
    return crypto_aead_aes256gcm_is_available() ? 0 : GDP_AUTH_E_NO_AES;
}

int gdp_auth_init(struct gdp_auth *a, uint16_t opt_class, uint64_t first_seq, uint64_t floor) {
    int rc = gdp_auth_available();
    if (rc < 0)
        return rc;
    if (opt_class < 0xFFF0)
        return GDP_AUTH_E_ARGS;
    memset(a, 0, sizeof(*a));
    atomic_init(&a->ring, NULL);
    atomic_init(&a->next_seq, first_seq);
    a->floor = floor;
    a->opt_class = opt_class;
    for (int i = 0; i < WINDOW_SLOTS; i++)
        pthread_mutex_init(&a->win[i].lock, NULL);
    return 0;
}

void gdp_auth_destroy(struct gdp_auth *a) {
    for (int i = 0; i < WINDOW_SLOTS; i++)
        pthread_mutex_destroy(&a->win[i].lock);
    sodium_memzero(a, sizeof(*a));
}

static void derive(crypto_aead_aes256gcm_state *st, const uint8_t *master, uint64_t salt) {
    uint8_t sub[crypto_aead_aes256gcm_KEYBYTES];
    crypto_kdf_derive_from_key(sub, sizeof(sub), salt, GDP_AUTH_KDF_CTX, master);
    crypto_aead_aes256gcm_beforenm(st, sub);
    sodium_memzero(sub, sizeof(sub));
}

int gdp_auth_ring_init(struct gdp_auth_ring *r, const uint8_t *ids, const uint8_t *keys,
                       const uint8_t *slots, uint32_t n, int send, uint64_t salt) {
    if (n < 1 || n > GDP_AUTH_MAX_KEYS || send < -1 || send >= (int)n)
        return GDP_AUTH_E_ARGS;
    for (uint32_t i = 0; i < n; i++)
        if (slots[i] >= WINDOW_SLOTS || (i && (ids[i] == ids[0] || slots[i] == slots[0])))
            return GDP_AUTH_E_ARGS;
    memset(r, 0, sizeof(*r));
    r->gen = atomic_fetch_add(&ring_gen, 1) + 1;
    r->salt = salt;
    r->n = n;
    r->send = send;
    for (uint32_t i = 0; i < n; i++) {
        r->keys[i].id = ids[i];
        r->keys[i].slot = slots[i];
        memcpy(r->keys[i].master, keys + (size_t)i * GDP_AUTH_KEY_LEN, GDP_AUTH_KEY_LEN);
    }
    if (send >= 0)
        derive(&r->send_state, r->keys[send].master, salt);
    return 0;
}

void gdp_auth_set_ring(struct gdp_auth *a, struct gdp_auth_ring *r, int reset_slot_mask) {
    for (int i = 0; i < WINDOW_SLOTS; i++) {
        if (!(reset_slot_mask & (1 << i)))
            continue;
        pthread_mutex_lock(&a->win[i].lock);
        a->win[i].used = 0;
        a->win[i].top = 0;
        pthread_mutex_unlock(&a->win[i].lock);
    }
    atomic_store_explicit(&a->ring, r, memory_order_release);
}

uint64_t gdp_auth_next_seq(const struct gdp_auth *a) {
    return atomic_load_explicit(&((struct gdp_auth *)a)->next_seq, memory_order_relaxed);
}

void gdp_auth_tick(struct gdp_auth *a, uint64_t now_seq) {
    uint64_t cur = atomic_load_explicit(&a->next_seq, memory_order_relaxed);
    while (cur < now_seq &&
           !atomic_compare_exchange_weak_explicit(&a->next_seq, &cur, now_seq,
                                                  memory_order_relaxed, memory_order_relaxed))
        ;
}

uint64_t gdp_auth_clock_seq(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t us = (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
    return us << GDP_AUTH_SEQ_SHIFT;
}

long gdp_auth_find(const uint8_t *geneve, size_t len, uint16_t opt_class, uint8_t type) {
    if (len < GDP_BASE_HEADER_LEN)
        return -1;
    size_t end = GDP_BASE_HEADER_LEN + (size_t)(geneve[0] & 0x3F) * 4;
    if (end > len)
        return -1;
    size_t pos = GDP_BASE_HEADER_LEN;
    while (end - pos >= 4) {
        size_t olen = 4 + (size_t)(geneve[pos + 3] & 0x1F) * 4;
        if (olen > end - pos)
            return -1;
        if (gdp_load16(geneve + pos) == opt_class && geneve[pos + 2] == type)
            return (long)pos;
        pos += olen;
    }
    return -1;
}

static void nonce_of(uint8_t nonce[crypto_aead_aes256gcm_NPUBBYTES], uint64_t seq) {
    memset(nonce, 0, 4);
    store64(nonce + 4, seq);
}

static void gmac(uint8_t tag[GDP_AUTH_TAG_LEN], const crypto_aead_aes256gcm_state *st,
                 uint64_t seq, const uint8_t *ad, size_t len) {
    uint8_t nonce[crypto_aead_aes256gcm_NPUBBYTES];
    uint8_t none[1] = {0}; /* the empty message: its (no) ciphertext goes here */
    unsigned long long tlen;
    nonce_of(nonce, seq);
    crypto_aead_aes256gcm_encrypt_detached_afternm(none, tag, &tlen, none, 0, ad, len, NULL,
                                                   nonce, st);
}

/* Writes key ID, salt and sequence number, zeroes the MAC field; returns the ring. */
static const struct gdp_auth_ring *sign_fields(struct gdp_auth *a, uint8_t *opt,
                                               uint64_t *seq) {
    const struct gdp_auth_ring *r = atomic_load_explicit(&a->ring, memory_order_acquire);
    if (!r || r->send < 0)
        return NULL;
    *seq = atomic_fetch_add_explicit(&a->next_seq, 1, memory_order_relaxed);
    opt[GDP_AUTH_OFF_KEY_ID] = r->keys[r->send].id;
    memset(opt + GDP_AUTH_OFF_KEY_ID + 1, 0, 3);
    store64(opt + GDP_AUTH_OFF_SALT, r->salt);
    store64(opt + GDP_AUTH_OFF_SEQ, *seq);
    memset(opt + GDP_AUTH_OFF_TAG, 0, GDP_AUTH_TAG_LEN);
    return r;
}

int gdp_auth_sign(struct gdp_auth *a, uint8_t *geneve, size_t len, size_t opt_off) {
    uint64_t seq;
    uint8_t *opt = geneve + opt_off;
    const struct gdp_auth_ring *r = sign_fields(a, opt, &seq);
    if (!r)
        return GDP_AUTH_E_NO_KEY;
    uint8_t tag[GDP_AUTH_TAG_LEN];
    gmac(tag, &r->send_state, seq, geneve, len);
    memcpy(opt + GDP_AUTH_OFF_TAG, tag, GDP_AUTH_TAG_LEN);
    return 0;
}

int gdp_auth_sign2(struct gdp_auth *a, uint8_t *geneve, size_t len1, const uint8_t *rest,
                   size_t len2, size_t opt_off, uint8_t *scratch, size_t cap) {
    if (len1 + len2 > cap)
        return GDP_AUTH_E_ARGS;
    uint64_t seq;
    uint8_t *opt = geneve + opt_off;
    const struct gdp_auth_ring *r = sign_fields(a, opt, &seq);
    if (!r)
        return GDP_AUTH_E_NO_KEY;
    memcpy(scratch, geneve, len1);
    memcpy(scratch + len1, rest, len2);
    uint8_t tag[GDP_AUTH_TAG_LEN];
    gmac(tag, &r->send_state, seq, scratch, len1 + len2);
    memcpy(opt + GDP_AUTH_OFF_TAG, tag, GDP_AUTH_TAG_LEN);
    return 0;
}

/* RFC 6479: accept each sequence number once, and none older than the window. */
static int window_accept(struct window *w, uint64_t seq) {
    int ok = 1;
    pthread_mutex_lock(&w->lock);
    uint64_t word = seq / 64, bit = (uint64_t)1 << (seq % 64);
    if (!w->used) {
        memset(w->bits, 0, sizeof(w->bits));
        w->used = 1;
        w->top = seq;
    } else if (seq > w->top) {
        uint64_t top_word = w->top / 64;
        uint64_t clear = word - top_word < WINDOW_WORDS ? word - top_word : WINDOW_WORDS;
        for (uint64_t i = 1; i <= clear; i++)
            w->bits[(top_word + i) % WINDOW_WORDS] = 0;
        w->top = seq;
    } else if (w->top - seq >= GDP_AUTH_WINDOW) {
        ok = 0;
    } else if (w->bits[word % WINDOW_WORDS] & bit) {
        ok = 0;
    }
    if (ok)
        w->bits[word % WINDOW_WORDS] |= bit;
    pthread_mutex_unlock(&w->lock);
    return ok;
}

int gdp_auth_verify(struct gdp_auth *a, struct gdp_auth_cache *c, uint8_t *geneve,
                    size_t len, size_t *opt_off) {
    long off = gdp_auth_find(geneve, len, a->opt_class, GDP_AUTH_OPT_TYPE);
    if (off < 0)
        return GDP_AUTH_MISSING;
    uint8_t *opt = geneve + off;
    /* An option of another size names no key and carries no MAC: it cannot verify
     * (and its key ID may not even be inside it). */
    if ((opt[3] & 0x1F) * 4 != GDP_AUTH_DATA_LEN)
        return GDP_AUTH_BAD_MAC;
    const struct gdp_auth_ring *r = atomic_load_explicit(&a->ring, memory_order_acquire);
    const struct ring_key *k = NULL;
    for (uint32_t i = 0; r && i < r->n; i++)
        if (r->keys[i].id == opt[GDP_AUTH_OFF_KEY_ID])
            k = &r->keys[i];
    if (!k)
        return GDP_AUTH_UNKNOWN_KEY;
    uint64_t salt = load64(opt + GDP_AUTH_OFF_SALT);
    uint64_t seq = load64(opt + GDP_AUTH_OFF_SEQ);

    /* The derived key of this sender: cached per thread, derived on a miss and cached
     * only once a packet verified with it (forged salts do not evict real senders). */
    const crypto_aead_aes256gcm_state *st = NULL;
    for (int i = 0; i < CACHE_ENTRIES; i++) {
        struct cache_entry *e = &c->e[i];
        if (e->used && e->gen == r->gen && e->key_id == k->id && e->salt == salt)
            st = &e->state;
    }
    struct cache_entry fresh;
    if (!st) {
        derive(&fresh.state, k->master, salt);
        st = &fresh.state;
    }
    uint8_t got[GDP_AUTH_TAG_LEN], want[GDP_AUTH_TAG_LEN];
    memcpy(got, opt + GDP_AUTH_OFF_TAG, GDP_AUTH_TAG_LEN);
    memset(opt + GDP_AUTH_OFF_TAG, 0, GDP_AUTH_TAG_LEN);
    gmac(want, st, seq, geneve, len);
    memcpy(opt + GDP_AUTH_OFF_TAG, got, GDP_AUTH_TAG_LEN);
    if (crypto_verify_16(got, want) != 0)
        return GDP_AUTH_BAD_MAC;
    if (st == &fresh.state) {
        struct cache_entry *e = &c->e[c->next++ % CACHE_ENTRIES];
        memcpy(&e->state, &fresh.state, sizeof(e->state));
        e->gen = r->gen;
        e->salt = salt;
        e->key_id = k->id;
        e->used = 1;
        sodium_memzero(&fresh, sizeof(fresh));
    }
    if (seq < a->floor || !window_accept(&a->win[k->slot], seq))
        return GDP_AUTH_REPLAYED;
    *opt_off = (size_t)off;
    return GDP_AUTH_OK;
}
