/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_bridge_int.h - what bridge.c (the broker thread's side) and bridge_loop.c (the bridge
 * thread) share: the device and the bridge. Private to those two files. Threads, ownership and
 * the lock order: docs/DESIGN.md. Each field says who may touch it:
 *   const    set before the device or bridge is shared, read-only after: any thread
 *   locked   under akz_bridge.lock
 *   broker   the broker thread only
 *   bridge   the bridge thread only (before it starts and after it stopped: the thread that
 *            starts and stops it) */
#ifndef AKZ_BRIDGE_INT_H
#define AKZ_BRIDGE_INT_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <openssl/ssl.h>
#include <mosquitto.h>
#include "akz_bridge.h"
#include "akz_conn.h"
#include "akz_evloop.h"
#include "akz_handoff.h"
#include "akz_htab.h"
#include "akz_keystore.h"
#include "akz_mint.h"
#include "akz_queue.h"
#include "akz_resolver.h"
#include "akz_spool.h"
#include "akz_status.h"
#include "akz_util.h"
#include "akz_wakeup.h"
#include "akz_window.h"

/* What the broker thread asks the bridge thread to do with a device (struct dev.work). */
enum {
	WORK_ADOPT = 1,              /* new: start running it */
	WORK_UPLINKS = 2,            /* new pending uplinks */
	WORK_CHANGED = 4,            /* enabled or next_key changed */
	WORK_RECONNECT = 8,          /* the control API asks for a new connection */
	WORK_REMOVE = 16,            /* gone from the registry: free it (the broker has let go of it) */
};

struct dev {
	struct akz_htab_node node;   /* in b->devices, keyed by id: broker writes, both read (locked) */
	char *id;                    /* const */
	struct akz_bridge *b;        /* const */
	struct akz_spool_dev *sd;    /* const: its share of the spool (lives as long as the spool), or NULL */

	/* locked */
	struct dev *inbox_next;      /* on b->inbox while work != 0 */
	unsigned work;               /* WORK_* for the bridge thread */
	struct akz_msgq pending;     /* accepted, not yet handed to libmosquitto: the broker appends,
	                              * the bridge takes from the head */
	size_t unacked;              /* pending + handed over and not yet acknowledged or written */
	bool enabled;                /* as the registry says */
	bool removed;                /* out of the table: counted out of the summary already */
	bool acks_will_pump;         /* its window is nearly full and pending waits for room: the
	                              * bridge thread takes pending after the next PUBACK, so new
	                              * uplinks need no wake-up (set in the locked step that looked at
	                              * pending; cleared when the connection's state changes) */
	struct akz_key *next_key;    /* the key to switch to (WORK_CHANGED), or NULL */
	struct akz_status_dev status;   /* as status topics and the control API show it (queued and
	                                 * the spool's figures are filled in when it is copied) */

	/* bridge */
	struct dev *prev, *next;     /* b->devs: every device the thread runs */
	bool adopted;                /* on b->devs */
	struct akz_conn conn;        /* the connection's state machine */
	struct akz_ev_io io;         /* the connection's socket in the loop */
	struct akz_ev_timer timer;   /* the first of the device's deadlines (dev_next_due) */
	struct akz_window win;       /* uplinks waiting for their PUBACK */
	struct akz_key *key;
	struct akz_mint *mint;       /* its next token, minted on the key thread (a key in a TPM) */
	struct mosquitto *mosq;      /* NULL until the first connect */
	int zombie_fd;               /* a socket given up on that libmosquitto has yet to close */
	bool disconnect_seen;        /* on_disconnect ran during the last libmosquitto call */
	bool out_blocked;            /* the socket did not take all of the write buffer */
	bool in_flush, in_reread, in_slot_queue;
	struct dev *flush_next;      /* on b->flush: wrote this turn, the buffer goes out at its end */
	struct dev *reread_next;     /* on b->reread: OpenSSL holds input epoll cannot see */
	struct dev *slot_next;       /* on b->slot_queue: waits for a connect slot */
	int acked;                   /* PUBACKs taken by the last read, not yet counted */
	int64_t out_ms;              /* when the connection last wrote (libmosquitto's keepalive) */
	int64_t acked_ms;            /* the last PUBACK, or when the window last went from empty to not */
	int64_t status_sent_ms;      /* when its status was last handed to the broker thread */
	bool status_due;             /* a status change waits for status_interval_ms to pass */
	uint64_t expired;            /* dropped by the TTL, not yet logged */
	char last_log[200];          /* libmosquitto's last error (a TLS failure), until CONNACK */
	char addr[AKZ_ADDR_MAX];     /* the upstream address of the last connect ("": none) */
};

/* One per plugin instance: field order follows meaning, not padding. */
struct akz_bridge { /* NOLINT(clang-analyzer-optin.performance.Padding) */
	/* const: copied from the configuration */
	char *host;
	char *username;
	char *audience;              /* tokens' aud: https://<audience>/devices/<id> */
	int port;
	int keepalive;
	long lifetime;
	int connect_rate;
	int max_handshakes;          /* connections between connect and CONNACK at once */
	size_t queue_max;
	int64_t ttl;                 /* seconds; 0: forever */
	bool spool_qos0;
	bool receipts;
	char *receipts_prefix;
	int status_interval_ms;
	int light_pause_ms;          /* plugin_opt_light_pause_ms (0: never pause) */
	SSL_CTX *ssl_ctx;
	bool tlsio_ready;            /* akz_tlsio_init succeeded: cleanup is due */
	struct akz_resolver *resolver;      /* thread-safe */
	struct akz_wakeup *wakeup;   /* thread-safe; NULL: the broker's TICK comes in its own time */
	struct akz_spool *spool;     /* thread-safe; NULL: uplinks wait in memory only */
	struct akz_handoff *out;     /* thread-safe: to the broker thread */
	struct akz_evloop *loop;     /* the bridge thread's (wake and stop: any thread) */
	struct akz_thread thread;    /* broker */

	pthread_mutex_t lock;
	struct akz_htab devices;     /* locked: every device of the registry, by id */
	struct dev *inbox;           /* locked: devices with work for the bridge thread */
	struct akz_status_summary sum;   /* locked */
	bool sum_dirty;              /* locked */

	/* broker */
	int64_t sum_published_ms;
	struct akz_status_sent sum_sent;   /* what the counters' own topics last showed */
	int64_t last_tick_ms;        /* when akz_bridge_tick last ran (0: never) */
	int64_t started_ms;
	bool no_tick_reported;
	size_t fds_told_devices;     /* the device count and open-file limit a tight limit was */
	size_t fds_told_limit;       /* last reported for (reserve_fds) */

	/* bridge */
	struct dev *devs;            /* every device it runs */
	size_t nstate[AKZ_CONN_NSTATES];   /* devices in each state */
	struct dev *flush;           /* devices that wrote this loop turn */
	struct dev *reread;          /* devices with input left in OpenSSL */
	size_t turn_sent;            /* uplinks handed to libmosquitto this loop turn */
	struct dev *slot_queue, **slot_tail;   /* devices waiting for a connect slot, first come first */
	bool slots_changed;          /* a slot may be free: look at slot_queue before sleeping */
	struct akz_ev_timer slot_timer;     /* when the rate or the name lookup may let one through */
	struct akz_ev_timer clock_timer;    /* looks for wall-clock steps every second */
	struct akz_ev_timer outage_timer;   /* sums up the devices not connected once a minute */
	struct akz_ev_timer trim_timer;     /* gives memory back after a connect storm */
	struct akz_ev_timer repoke_timer;   /* repeats a broker wake-up the TICK did not take */
	double bucket;               /* connect-rate token bucket */
	int64_t bucket_ms;
	int handshakes;              /* connections between connect and CONNACK */
	int64_t pilot_until;         /* 0: no connect yet; else the end of the wait for a TLS session */
	bool pilot_done;             /* a TLS session exists (or the wait is over) */
	int64_t wall_off;            /* wall minus monotonic clock at the last look */
	size_t failed_since_report;  /* connection failures since the last outage report */
	char last_failure[240];      /* the newest of them: "device 'X': reason" */
};

/* ---- bridge.c ------------------------------------------------------------------------------ */

/* Copies the device's status for the broker thread's queue (out) with its queued count. Caller
 * holds b->lock. */
void bridge_status_copy_locked(const struct dev *d, struct akz_status_dev *out);

/* ---- bridge_loop.c: the bridge thread ----------------------------------------------------------- */

/* The bridge thread: arg is the struct akz_bridge; returns NULL once the loop is stopped. */
void *bridge_main(void *arg);

/* Frees a device the bridge thread no longer runs (or never adopted): its connection, keys,
 * and its queued uplinks, which go back to the spool. Bridge thread, or any thread once the
 * bridge thread has stopped. */
void bridge_destroy_dev(struct dev *d);

#endif
