/* akz_bridge_int.h - what bridge.c (the broker-thread side) and bridge_loop.c (the bridge
 * thread) share: the device and bridge structures. Private to those two files. */
#ifndef AKZ_BRIDGE_INT_H
#define AKZ_BRIDGE_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <openssl/ssl.h>
#include <mosquitto.h>
#include "akz_bridge.h"
#include "akz_keystore.h"
#include "akz_mint.h"
#include "akz_queue.h"
#include "akz_resolver.h"
#include "akz_spool.h"
#include "akz_status.h"
#include "akz_util.h"
#include "akz_wakeup.h"

/* Uplinks in flight per connection (handed to libmosquitto, no PUBACK yet); a power of two
 * (take_inflight finds a slot by mid). libmosquitto walks its whole list of them on every
 * PUBACK, so more is not free. */
#define WINDOW 32

enum dev_state { ST_DISABLED, ST_CONNECTING, ST_CONNECTED, ST_BACKOFF, ST_UNAUTHORIZED };

/* The names of the states in status messages and the log, indexed by enum dev_state. */
extern const char *const bridge_state_names[];

/* An uplink handed to libmosquitto and waiting for its PUBACK: kept for the spool's bookkeeping
 * and the delivery receipt (libmosquitto keeps its own copy to resend). */
struct inflight {
	int mid;
	struct akz_msg *m;           /* NULL: slot free */
};

struct dev {
	char *id;                    /* read-only after creation */
	struct akz_bridge *b;

	/* Guarded by b->lock. */
	struct dev *hnext;           /* hash chain */
	struct dev *ready_next;      /* on b->ready: has new pending uplinks */
	struct dev *dirty_next;      /* on b->dirty: status to publish */
	struct dev *incoming_next;   /* on b->incoming: new, not yet adopted by the thread */
	struct akz_msgq pending;     /* accepted, not yet handed to libmosquitto */
	struct akz_spool_dev *sd;    /* its share of the spool, NULL without one */
	size_t unacked;              /* pending + handed over and not yet acknowledged */
	bool enabled;
	bool removed;
	bool changed;                /* enabled or next_key changed by a sync */
	bool reconnect_requested;    /* akz_bridge_reconnect: drop the connection and connect again */
	bool in_ready, in_dirty;
	/* The bridge thread will take new pending uplinks without being woken: held uplinks (the
	 * flush at the hold's end pumps first), a full window (the next PUBACK's read pumps) or a
	 * connection not up (the CONNACK's read pumps) comes first. Set by the bridge thread in
	 * the same locked step as its last look at pending (pump_uplinks, hold_uplinks). */
	bool pump_promised;
	struct akz_key *next_key;    /* key to switch to after a sync, or NULL */
	struct akz_status_dev status;
	int64_t status_published_ms;

	/* Guards what follows, and the device's libmosquitto client, while the bridge thread works
	 * on the device: the broker thread may take it (try, never wait) to write an idle device's
	 * uplink itself (bridge_send_direct). Taken before b->lock, never after. */
	pthread_mutex_t io_lock;

	/* Bridge thread only, or the broker thread holding io_lock. */
	struct dev *next;            /* the thread's list of every device (bridge thread only) */
	struct akz_key *key;
	struct akz_mint *mint;       /* its next token, minted on the key thread (a key in a TPM) */
	struct mosquitto *mosq;
	enum dev_state state;
	int fd;                      /* the socket registered in epoll, or -1 */
	int zombie_fd;               /* a socket given up on that libmosquitto has yet to close */
	bool disconnect_seen;        /* on_disconnect ran during the last libmosquitto call */
	uint32_t events;
	int64_t due_ms;              /* next connect attempt, or token refresh when connected */
	int64_t connect_deadline_ms;
	int64_t drain_deadline_ms;
	int64_t waiting_ack_since_ms;
	int64_t minted_wall_offset;  /* wall minus monotonic clock when the token was minted */
	bool refreshing;
	unsigned sweep_phase;        /* swept while connected when b->sweep_turn % SWEEP_SPREAD is this */
	bool handshaking;            /* counted in b->handshakes */
	bool in_reread;              /* on b->reread */
	struct dev *reread_next;
	bool in_flush;               /* on b->flush */
	bool out_blocked;            /* the socket did not take all of the write buffer */
	struct dev *flush_next;
	int64_t flush_due_us;        /* on b->flush: when flush_outputs takes it (0: this turn) */
	int64_t hold_until_us;       /* when held uplinks go at the latest (0: none held) */
	int64_t last_flush_us;       /* when the write buffer last went out */
	bool urgent;                 /* a read wrote something (a PUBACK): no holding this turn */
	bool reconnect_now;
	bool ever_connected;
	bool news;                   /* the last state change was logged at the normal level */
	int failures;
	uint8_t failed_as;           /* ST_BACKOFF or ST_UNAUTHORIZED: the last failure's state */
	int inflight;
	uint64_t sent_upto;          /* seq of the last spooled uplink taken off pending */
	uint64_t expired;            /* dropped by the TTL since the last log line */
	struct inflight fl[WINDOW];
	char last_log[200];          /* libmosquitto's last error, e.g. the TLS failure */
	char addr[AKZ_ADDR_MAX];     /* the upstream address of the last connect ("": none) */
};

struct log_line {
	struct log_line *next;
	int level;
	char text[];
};

/* One per plugin instance: field order follows meaning, not padding. */
struct akz_bridge { /* NOLINT(clang-analyzer-optin.performance.Padding) */
	/* copied from the configuration */
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
	SSL_CTX *ssl_ctx;
	bool tlsio_ready;            /* akz_tlsio_init succeeded: cleanup is due */
	struct akz_resolver *resolver;
	struct akz_wakeup *wakeup;   /* NULL: downlinks wait for the broker's own TICK */

	struct akz_spool *spool;     /* NULL: uplinks wait in memory only */

	pthread_t thread;
	bool thread_started;
	int epfd;
	int wakefd;
	atomic_bool stop;

	/* The log queue has a lock of its own, taken last and around nothing else: the spool logs
	 * (through spool_log) while holding its lock, and the broker thread takes the spool's lock
	 * while holding `lock` (publish_statuses); one lock for both was a lock-order inversion
	 * (spool -> bridge, bridge -> spool) that ThreadSanitizer reported: the flusher logging an
	 * I/O error during a TICK could deadlock the broker. */
	pthread_mutex_t log_lock;
	struct log_line *log_head, *log_tail;   /* guarded by log_lock */
	size_t log_count, log_dropped;

	pthread_mutex_t lock;
	/* Guarded by lock. */
	struct dev **buckets;
	size_t nbuckets;
	size_t ndevs;
	struct dev *ready;
	struct dev *dirty;
	struct dev *incoming;
	bool wake_pending;
	int64_t load_start_us;       /* when the current count of uplinks relayed began */
	int64_t load_count;          /* uplinks handed to libmosquitto since */
	atomic_llong load_rate;      /* uplinks/s relayed over the last count's span (any thread reads) */
	bool wake_at_tick;           /* broker thread only: uplinks arrived this loop turn */
	int64_t last_tick_us;        /* broker thread only: when akz_bridge_tick last ran (0: never) */
	bool woke_this_turn;         /* broker thread only: an uplink woke the bridge since that TICK */
	int64_t started_ms;          /* broker thread only: when akz_bridge_start ran */
	int64_t wall_off;            /* bridge thread only: wall_offset_s() at the last sweep */
	bool wall_off_known;         /* bridge thread only */
	bool no_tick_reported;       /* broker thread only */
	size_t fds_told_devices;     /* broker thread only: the device count and open-file limit */
	size_t fds_told_limit;       /*   a tight limit was last reported for (reserve_fds) */
	bool changes;                /* some device has changed or removed set */
	struct akz_msgq down;
	struct akz_status_summary sum;
	bool sum_dirty;
	int64_t sum_published_ms;
	struct akz_status_sent sum_sent;   /* broker thread only: the counters' topics */

	/* Bridge thread only. */
	struct dev *devs;
	double bucket;               /* connect-rate token bucket */
	int64_t bucket_ms;
	int64_t next_sweep_ms;
	unsigned sweep_turn;         /* sweeps so far (wraps) */
	size_t adopted;              /* devices adopted so far: spreads their sweep phases */
	int64_t last_connect_ms;     /* when the last connection attempt started */
	int64_t outage_report_ms;    /* when the sweep last summed up the devices not connected */
	size_t failed_since_report;  /* connection failures since then */
	char last_failure[240];      /* the newest of them: "device 'X': reason" */
	bool trim_due;               /* connects happened since memory was last given back */
	int64_t pilot_until;         /* 0: no connect yet; else the end of the wait for a session */
	int handshakes;              /* connections between connect and CONNACK */
	struct dev *reread;          /* devices with input left in OpenSSL: read_socket */
	struct dev *flush;           /* devices with records to write (tlsio.c) or uplinks held */
	int64_t next_flush_us;       /* the earliest flush_due_us on b->flush */
	int coalesce_us;             /* plugin_opt_uplink_coalesce_us */
	int coalesce_rate;           /* plugin_opt_uplink_coalesce_rate */
	bool direct;                 /* plugin_opt_uplink_direct */
	bool connects_held;          /* a due device waits for a handshake slot */
	bool pilot_done;             /* a TLS session exists (or the wait is over) */
};

/* ---- bridge.c: hand-offs to the broker thread -------------------------------------------- */

/* Queues a log line for the broker thread: mosquitto_log_printf may publish to $SYS
 * (log_dest topic), which only the broker thread may do. Any thread; never fails; drops (and
 * counts) lines when the broker thread falls far behind. */
void bridge_log(struct akz_bridge *b, int level, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* Marks the device's status for publishing. Caller holds b->lock. */
void bridge_mark_dirty_locked(struct akz_bridge *b, struct dev *d);

/* ---- bridge_loop.c: the bridge thread -------------------------------------------------- */

/* The bridge thread: arg is the struct akz_bridge; returns NULL once b->stop is set. */
void *bridge_main(void *arg);

/* Wakes the bridge thread out of epoll_wait. Any thread; never fails (a lost wake only means
 * the next sweep, within 100 ms, does the work). */
void bridge_wake(struct akz_bridge *b);

/* Writes the device's new uplink (the only one pending, pump_promised not set) from the calling
 * broker thread, if the device is idle: connected, its window open, nothing buffered or held,
 * and no write of its went out in the last two coalescing limits. Why: at a light load every
 * uplink handed to a sleeping bridge thread waits for a thread wake-up (tens of us in a VM),
 * the built-in bridge's lead in latency; a busy device's uplinks still go through the bridge
 * thread, where they share writes. Returns true when it was written (or the socket was full
 * and EPOLLOUT now watches it); false when the device was not idle, the bridge thread was
 * working on it, or the write failed: then the caller hands it over as usual (mark ready and
 * wake), and the bridge thread finds any error itself. Never blocks. */
bool bridge_send_direct(struct dev *d);

/* Frees a device the bridge thread no longer runs (or never adopted): its connection, keys,
 * and its queued uplinks, which go back to the spool. Bridge thread, or any thread once the
 * bridge thread has stopped. */
void bridge_destroy_dev(struct dev *d);

#endif
