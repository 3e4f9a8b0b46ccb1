/* The engine's counters and drop reasons, one line each. These lists are the only
 * place they are spelled: the C enum, the struct fields and the name tables that
 * Python reads through cffi (gdp_drop_name, gdp_counter_name) are made from them.
 *
 * A drop reason is X(ENUM_SUFFIX, name, scope): SOCK reasons are counted per receive
 * socket (no tunnel can be named for the packet), TUNNEL reasons per tunnel. */
#ifndef GDP_COUNTERS_H
#define GDP_COUNTERS_H

#define GDP_DROP_REASONS(X)                                                                 \
    X(TRUNCATED, truncated, SOCK)                   /* UDP payload shorter than GENEVE's */ \
    X(BAD_VERSION, bad_version, SOCK)               /* Ver != 0 */                          \
    X(OPTIONS_TRUNCATED, options_truncated, SOCK)   /* Opt Len reaches past the packet */   \
    X(OPTION_OVERRUNS, option_overruns, SOCK)       /* options do not add up to Opt Len */  \
    X(UNKNOWN_VNI, unknown_vni, SOCK)               /* no tunnel has this VNI */            \
    X(WRONG_REMOTE, wrong_remote, SOCK)             /* VNI known, source not its remote */  \
    X(CRITICAL_OPTION, critical_option, TUNNEL)     /* an unknown critical option */        \
    X(C_BIT_MISMATCH, c_bit_mismatch, TUNNEL)       /* C bit disagrees with the options */  \
    X(WRONG_PROTOCOL, wrong_protocol, TUNNEL)       /* protocol not carried in this mode */ \
    X(INNER_TRUNCATED, inner_truncated, TUNNEL)     /* inner frame shorter than its hdrs */ \
    X(ECN_NOT_ECT, ecn_not_ect, TUNNEL)             /* outer CE on Not-ECT (RFC 6040) */    \
    X(OWN_MAC, own_mac, TUNNEL)                     /* inner source MAC is the device's */  \
    X(CONTROL_QUEUE_FULL, control_queue_full, TUNNEL) /* O-bit packet, queue full */        \
    X(DEV_WRITE, dev_write, TUNNEL)                 /* writing to the device failed */      \
    X(TOO_BIG, too_big, TUNNEL)                     /* over the path MTU (ICMP if IP) */    \
    X(TX_BAD_FRAME, tx_bad_frame, TUNNEL)           /* device frame not encapsulable */     \
    X(TX_ERROR, tx_error, TUNNEL)                   /* the underlay send failed */       \
    X(AUTH_MISSING, auth_missing, TUNNEL)           /* no integrity option (auth.h) */      \
    X(AUTH_UNKNOWN_KEY, auth_unknown_key, TUNNEL)   /* its key ID is not in the ring */     \
    X(AUTH_BAD_MAC, auth_bad_mac, TUNNEL)           /* the MAC does not verify */           \
    X(AUTH_REPLAYED, auth_replayed, TUNNEL)         /* sequence seen, or behind the window */

/* Per-tunnel event counters, summed over the workers by Python under these names. */
#define GDP_TUNNEL_COUNTERS(X)                                                            \
    X(rx_packets)    /* inner frames delivered (a super-frame: each segment) */          \
    X(rx_bytes)      /* their inner bytes */                                             \
    X(tx_packets)    /* inner frames sent (a super-frame: each segment) */               \
    X(tx_bytes)      /* their inner bytes */                                             \
    X(control)       /* O-bit packets received */                                        \
    X(tx_fragmented) /* packets sent as several outer fragments */                       \
    X(tx_gso_frames) /* TSO super-frames read from the device (vnet_hdr) */              \
    X(rx_gro_frames) /* super-frames of coalesced received segments written */           \
    X(tx_injected)   /* super-frames sent whole through the inject device */

#define GDP_DROP_ENUM_(name, lower, scope) GDP_DROP_##name,
enum gdp_drop { GDP_DROP_REASONS(GDP_DROP_ENUM_) GDP_DROP_COUNT };
#undef GDP_DROP_ENUM_

#define GDP_COUNTER_ENUM_(name) GDP_COUNTER_##name,
enum gdp_counter { GDP_TUNNEL_COUNTERS(GDP_COUNTER_ENUM_) GDP_COUNTER_COUNT };
#undef GDP_COUNTER_ENUM_

#endif
