/* bridge.c - the upstream side: one thread, one epoll loop, one akenza connection per device. */
#include <errno.h>
#include <malloc.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <time.h>
#include <unistd.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mqtt_protocol.h>
#include "akz_bridge.h"
#include "akz_config.h"
#include "akz_fds.h"
#include "akz_jwt.h"
#include "akz_queue.h"
#include "akz_registry.h"
#include "akz_resolver.h"
#include "akz_spool.h"
#include "akz_status.h"
#include "akz_tls.h"
#include "akz_topic.h"
#include "akz_util.h"
#include "akz_wakeup.h"
#include "akz_tlsio.h"

#define WINDOW 32                 /* uplinks in flight per connection */
#define SWEEP_MS 100              /* timer resolution of the bridge thread */
#define CONNECT_TIMEOUT_MS 30000  /* from TCP connect to CONNACK */
#define REFRESH_DRAIN_MS 2000     /* wait for PUBACKs before a token refresh reconnects */
#define BACKOFF_MIN_MS 1000
#define BACKOFF_MAX_MS 120000
#define UNAUTH_MIN_MS 60000       /* a refused key is not fixed in seconds: ask again in minutes */
#define UNAUTH_MAX_MS 900000
#define CLOCK_JUMP_S 30           /* a wall-clock step larger than this re-mints the token */
#define DOWN_MAX 10000            /* downlinks waiting for the broker thread */
#define LOG_MAX 20000             /* log lines waiting for the broker thread (a fleet reconnecting) */
#define READY_BATCH 4096          /* devices pumped per loop turn before sockets get a look */
#define TRIM_AFTER_MS 5000        /* quiet time after connects before memory is given back */
#define TICK_RECENT_MS 20         /* a TICK this recent will come again: uplinks wake the bridge there */
#define READ_ROUNDS 64            /* loop_read calls per device and turn while OpenSSL holds input */
#define HELD_SWEEP_MS 10          /* sweep interval while connects wait for a handshake slot */
#define PILOT_MS 2000             /* longest wait for the first TLS session before the others */

enum dev_state { ST_DISABLED, ST_CONNECTING, ST_CONNECTED, ST_BACKOFF, ST_UNAUTHORIZED };

static const char *const state_names[] = {
	[ST_DISABLED] = "disabled", [ST_CONNECTING] = "connecting", [ST_CONNECTED] = "connected",
	[ST_BACKOFF] = "backoff", [ST_UNAUTHORIZED] = "unauthorized",
};

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
	struct akz_key *next_key;    /* key to switch to after a sync, or NULL */
	struct akz_status_dev status;
	int64_t status_published_ms;

	/* Bridge thread only. */
	struct dev *next;            /* the thread's list of every device */
	struct akz_key *key;
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
	bool handshaking;            /* counted in b->handshakes */
	bool in_reread;              /* on b->reread */
	struct dev *reread_next;
	bool in_flush;               /* on b->flush */
	bool out_blocked;            /* the socket did not take all of the write buffer */
	struct dev *flush_next;
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
	bool wake_at_tick;           /* broker thread only: uplinks arrived this loop turn */
	int64_t last_tick_ms;        /* broker thread only: when akz_bridge_tick last ran */
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

	/* Bridge thread only. */
	struct dev *devs;
	double bucket;               /* connect-rate token bucket */
	int64_t bucket_ms;
	int64_t next_sweep_ms;
	int64_t last_connect_ms;     /* when the last connection attempt started */
	int64_t outage_report_ms;    /* when the sweep last summed up the devices not connected */
	size_t failed_since_report;  /* connection failures since then */
	char last_failure[240];      /* the newest of them: "device 'X': reason" */
	bool trim_due;               /* connects happened since memory was last given back */
	int64_t pilot_until;         /* 0: no connect yet; else the end of the wait for a session */
	int handshakes;              /* connections between connect and CONNACK */
	struct dev *reread;          /* devices with input left in OpenSSL: read_socket */
	struct dev *flush;           /* devices with records in their write buffer (tlsio.c) */
	bool connects_held;          /* a due device waits for a handshake slot */
	bool pilot_done;             /* a TLS session exists (or the wait is over) */
};

/* ---- time ---------------------------------------------------------------------------- */

/* Wall clock minus monotonic clock, in seconds: it moves only when the wall clock is stepped. */
static int64_t wall_offset_s(void)
{
	return (int64_t)time(NULL) - akz_mono_ms() / 1000;
}

/* A uniformly random integer in [lo, hi]. */
static int64_t random_between(int64_t lo, int64_t hi)
{
	uint32_t r;
	if(hi <= lo) return lo;
	if(RAND_bytes((unsigned char *)&r, sizeof(r)) != 1) r = (uint32_t)rand();
	return lo + (int64_t)(r % (uint64_t)(hi - lo + 1));
}

/* ---- hand-offs to the broker thread ----------------------------------------------------- */

/* Queues a log line for the broker thread: mosquitto_log_printf may publish to $SYS
 * (log_dest topic), which only the broker thread may do. Never fails; drops (and counts)
 * lines when the broker thread falls far behind. */
static void blog(struct akz_bridge *b, int level, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void blog(struct akz_bridge *b, int level, const char *fmt, ...)
{
	char text[512];
	va_list ap;

	va_start(ap, fmt);
	int n = vsnprintf(text, sizeof(text), fmt, ap);
	va_end(ap);
	if(n < 0) return;
	size_t len = strlen(text);
	struct log_line *l = malloc(sizeof(*l) + len + 1);
	pthread_mutex_lock(&b->log_lock);
	if(l == NULL || b->log_count >= LOG_MAX){
		b->log_dropped++;
		free(l);
	}else{
		l->next = NULL;
		l->level = level;
		memcpy(l->text, text, len + 1);
		if(b->log_tail) b->log_tail->next = l;
		else b->log_head = l;
		b->log_tail = l;
		b->log_count++;
	}
	pthread_mutex_unlock(&b->log_lock);
}

/* Marks the device's status for publishing. Caller holds b->lock. */
static void mark_dirty_locked(struct akz_bridge *b, struct dev *d)
{
	if(!d->in_dirty){
		d->in_dirty = true;
		d->dirty_next = b->dirty;
		b->dirty = d;
	}
	b->sum_dirty = true;
}

/* The device's connection is no longer between connect and CONNACK. Never fails. */
static void end_handshake(struct dev *d)
{
	if(d->handshaking){
		d->handshaking = false;
		d->b->handshakes--;
	}
}

/* How loud a state change is. In an outage every device retries every minute or two: a line per
 * attempt made ~200 lines a second at 10,000 devices, gigabytes a day on a gateway's SD card.
 * So "connected" is a notice; the first failure of a run, and a change between backoff and
 * unauthorized, are info; "connecting" and further failures go to debug (their reasons may
 * alternate from one attempt to the next: a hang-up seen as EOF or as a TLS error); the sweep
 * sums up who is out, with the newest reason, once a minute (report_outage). Sets d->news. */
static int state_log_level(struct dev *d, enum dev_state st)
{
	d->news = st != ST_CONNECTING;
	if(st == ST_CONNECTED) return MOSQ_LOG_NOTICE;
	if(st == ST_BACKOFF || st == ST_UNAUTHORIZED){
		d->news = d->failures <= 1 || st != d->failed_as;
		d->failed_as = (uint8_t)st;
	}
	return d->news ? MOSQ_LOG_INFO : MOSQ_LOG_DEBUG;
}

/* Changes the device's state, logs the change and marks its status for publishing. */
static void set_state(struct dev *d, enum dev_state st, const char *error)
{
	struct akz_bridge *b = d->b;
	bool changed = d->state != st;

	if(st != ST_CONNECTING) end_handshake(d);
	d->state = st;
	pthread_mutex_lock(&b->lock);
	if(changed){
		if(d->removed){
			/* counted out of the summary by the sync that removed it */
		}else if(st == ST_CONNECTED){
			b->sum.connected++;
		}else if(d->status.state && strcmp(d->status.state, "connected") == 0){
			b->sum.connected--;
		}
		d->status.state = state_names[st];
		d->status.since = time(NULL);
	}
	if(error){
		snprintf(d->status.last_error, sizeof(d->status.last_error), "%s", error);
	}
	mark_dirty_locked(b, d);
	pthread_mutex_unlock(&b->lock);
	if(changed){
		blog(b, state_log_level(d, st), "akenza: device '%s': %s%s%s", d->id,
				state_names[st], error ? ": " : "", error ? error : "");
	}
}

/* ---- the device table (broker and bridge thread, under b->lock) -------------------------- */

static size_t hash_id(const char *id, size_t len)
{
	size_t h = 1469598103934665603ULL;
	for(size_t i = 0; i < len; i++){
		h ^= (unsigned char)id[i];
		h *= 1099511628211ULL;
	}
	return h;
}

static struct dev *find_locked(const struct akz_bridge *b, const char *id, size_t len)
{
	if(b->nbuckets == 0) return NULL;
	for(struct dev *d = b->buckets[hash_id(id, len) & (b->nbuckets - 1)]; d; d = d->hnext){
		if(strncmp(d->id, id, len) == 0 && d->id[len] == '\0') return d;
	}
	return NULL;
}

/* Makes room for `want` devices. Returns 0, or -1 when out of memory (table unchanged). */
static int reserve_locked(struct akz_bridge *b, size_t want)
{
	if(want <= b->nbuckets / 2 && b->nbuckets) return 0;
	size_t n = b->nbuckets ? b->nbuckets : 64;
	while(n / 2 < want) n *= 2;
	struct dev **nb = calloc(n, sizeof(struct dev *));
	if(nb == NULL) return -1;
	for(size_t i = 0; i < b->nbuckets; i++){
		struct dev *d = b->buckets[i];
		while(d){
			struct dev *next = d->hnext;
			size_t h = hash_id(d->id, strlen(d->id)) & (n - 1);
			d->hnext = nb[h];
			nb[h] = d;
			d = next;
		}
	}
	free(b->buckets);
	b->buckets = nb;
	b->nbuckets = n;
	return 0;
}

static void insert_locked(struct akz_bridge *b, struct dev *d)
{
	size_t h = hash_id(d->id, strlen(d->id)) & (b->nbuckets - 1);
	d->hnext = b->buckets[h];
	b->buckets[h] = d;
	b->ndevs++;
}

static void unlink_locked(struct akz_bridge *b, struct dev *d)
{
	struct dev **pp = &b->buckets[hash_id(d->id, strlen(d->id)) & (b->nbuckets - 1)];
	while(*pp && *pp != d) pp = &(*pp)->hnext;
	if(*pp) *pp = d->hnext;
	b->ndevs--;
}

/* ---- one device's connection (bridge thread) ------------------------------------------- */

/* Only a connection being made or in use belongs in the epoll set. */
static bool wants_io(const struct dev *d)
{
	return d->state == ST_CONNECTING || d->state == ST_CONNECTED;
}

/* Keeps epoll's interest in step with libmosquitto's socket, which changes on reconnects.
 * d->fd is always a socket that is open and registered, or -1: a socket libmosquitto closed
 * has left the epoll set by itself (see check_socket). */
static void update_interest(struct dev *d)
{
	struct akz_bridge *b = d->b;
	int fd = d->mosq && wants_io(d) ? mosquitto_socket(d->mosq) : -1;
	uint32_t ev = EPOLLIN | EPOLLRDHUP;

	if(fd == d->zombie_fd) fd = -1;
	if(fd >= 0 && (mosquitto_want_write(d->mosq) || d->out_blocked)) ev |= EPOLLOUT;
	if(fd != d->fd){
		if(d->fd >= 0) epoll_ctl(b->epfd, EPOLL_CTL_DEL, d->fd, NULL);
		d->fd = -1;
		d->events = 0;
		if(fd < 0) return;
		struct epoll_event e = {.events = ev, .data.ptr = d};
		if(epoll_ctl(b->epfd, EPOLL_CTL_ADD, fd, &e) == 0){
			d->fd = fd;
			d->events = ev;
		}else{
			blog(b, MOSQ_LOG_ERR, "akenza: device '%s': epoll_ctl: %s", d->id, strerror(errno));
		}
	}else if(fd >= 0 && ev != d->events){
		struct epoll_event e = {.events = ev, .data.ptr = d};
		if(epoll_ctl(b->epfd, EPOLL_CTL_MOD, fd, &e) == 0) d->events = ev;
	}
}

static void lost_connection(struct dev *d, int rc);
static void wake(struct akz_bridge *b);

/* Runs after every libmosquitto call that may close the socket. Some of its paths (a failed
 * TLS handshake) close it without calling on_disconnect: then the device would wait forever
 * for a connection that is gone, so the loss is handled here. */
static void check_socket(struct dev *d, int rc)
{
	if(d->fd >= 0 && mosquitto_socket(d->mosq) != d->fd){
		d->fd = -1;       /* closed, so already out of the epoll set */
		d->events = 0;
		if(!d->disconnect_seen && wants_io(d)) lost_connection(d, rc ? rc : MOSQ_ERR_CONN_LOST);
	}
	d->disconnect_seen = false;
	update_interest(d);
}

/* Gives up on the current connection at once: used when the peer is unresponsive or the
 * handshake died, cases in which libmosquitto may never report anything. The socket is shut
 * down (the peer sees the end now) and left to libmosquitto, which closes it at the next
 * connect. */
static void drop_connection(struct dev *d, const char *why, int rc)
{
	int fd = mosquitto_socket(d->mosq);
	if(d->fd >= 0) epoll_ctl(d->b->epfd, EPOLL_CTL_DEL, d->fd, NULL);
	d->fd = -1;
	d->events = 0;
	if(fd >= 0){
		shutdown(fd, SHUT_RDWR);
		d->zombie_fd = fd;
	}
	snprintf(d->last_log, sizeof(d->last_log), "%s", why);
	lost_connection(d, rc);
}

static int64_t backoff_ms(int failures, int64_t lo, int64_t hi)
{
	int64_t cap = lo;
	for(int i = 1; i < failures && cap < hi; i++) cap *= 2;
	if(cap > hi) cap = hi;
	/* "Equal jitter": never sooner than half the step, so a fleet spreads out but still backs off. */
	return random_between(cap / 2, cap);
}

static void schedule_retry(struct dev *d, enum dev_state st, const char *error)
{
	d->failures++;
	d->b->failed_since_report++;
	snprintf(d->b->last_failure, sizeof(d->b->last_failure), "device '%s': %s", d->id, error);
	int64_t wait = st == ST_UNAUTHORIZED ? backoff_ms(d->failures, UNAUTH_MIN_MS, UNAUTH_MAX_MS)
			: backoff_ms(d->failures, BACKOFF_MIN_MS, BACKOFF_MAX_MS);
	d->due_ms = akz_mono_ms() + wait;
	set_state(d, st, error);
}

/* Frees the window slot of mid. Returns its uplink (the caller owns it), or NULL if mid was not
 * one of ours (QoS 0 uplinks and the subscription also end up in on_publish). */
static struct akz_msg *take_inflight(struct dev *d, int mid)
{
	for(int i = 0; i < WINDOW; i++){
		if(d->fl[i].m && d->fl[i].mid == mid){
			struct akz_msg *m = d->fl[i].m;
			d->fl[i].m = NULL;
			d->inflight--;
			return m;
		}
	}
	return NULL;
}

/* The spool seq up to which every uplink of the device is done with: those in the window are
 * not, nor is anything still pending (which comes after sent_upto). */
static uint64_t done_upto(const struct dev *d)
{
	uint64_t upto = d->sent_upto;
	for(int i = 0; i < WINDOW; i++){
		const struct akz_msg *m = d->fl[i].m;
		if(m && m->seq && m->seq <= upto) upto = m->seq - 1;
	}
	return upto;
}

/* Tells the spool that m (taken off pending or out of the window) is done with. */
static void settle(struct dev *d, const struct akz_msg *m)
{
	if(m->spooled && d->sd) akz_spool_settle(d->b->spool, d->sd, m->spooled, 1, done_upto(d));
}

/* Hands m (may be NULL: out of memory) to the broker thread, which publishes it at its next TICK.
 * Returns false, with m freed and counted as an error, when m is NULL or the queue is full. */
static bool queue_for_broker(struct akz_bridge *b, struct akz_msg *m)
{
	bool queued = false;
	pthread_mutex_lock(&b->lock);
	if(m && b->down.count < DOWN_MAX){
		akz_msgq_push(&b->down, m);
		queued = true;
	}else{
		b->sum.errors++;
	}
	pthread_mutex_unlock(&b->lock);
	if(!queued) free(m);
	else akz_wakeup_poke(b->wakeup);   /* the TICK that publishes it now, not in up to 100 ms */
	return queued;
}

/* Queues the delivery receipt of m for the broker thread: on <prefix><id>, the uplink's
 * correlation data as property when it had some, and {"seq","topic","time"} as payload. */
static void queue_receipt(struct dev *d, const struct akz_msg *m)
{
	struct akz_bridge *b = d->b;
	char topic[512], body[700];

	snprintf(topic, sizeof(topic), "%s%s", b->receipts_prefix, d->id);
	int n = snprintf(body, sizeof(body), "{\"seq\":%" PRIu64 ",\"time\":%" PRId64 ",\"topic\":\"",
			m->seq, m->time);
	/* Topics come from the device's own uplinks (no quotes or controls pass the topic check,
	 * but escape anyway: this is JSON). */
	for(const char *c = m->topic; *c && n < (int)sizeof(body) - 8; c++){
		if(*c == '"' || *c == '\\') body[n++] = '\\';
		if((unsigned char)*c >= 0x20) body[n++] = *c;
	}
	n += snprintf(body + n, sizeof(body) - (size_t)n, "\"}");
	struct akz_msg *r = akz_msg_new(topic, strlen(topic), body, (uint32_t)n, 1, m->corr, m->corrlen);
	if(!queue_for_broker(b, r)){
		blog(b, MOSQ_LOG_ERR, "akenza: device '%s': receipt for uplink %" PRIu64 " dropped: the "
				"broker is not taking messages fast enough", d->id, m->seq);
	}
}

/* Counts uplinks as delivered: acknowledged by akenza (QoS 1) or written (QoS 0). */
static void count_relayed(struct dev *d, size_t n)
{
	pthread_mutex_lock(&d->b->lock);
	d->unacked -= n;
	d->b->sum.uplinks += n;
	if(!d->removed) d->b->sum.queued -= n;
	d->b->sum_dirty = true;
	pthread_mutex_unlock(&d->b->lock);
}

/* PUBACK of a QoS 1 uplink (QoS 0 ones also land here, untracked, when written). */
static void on_publish(struct mosquitto *mosq, void *obj, int mid)
{
	struct dev *d = obj;
	(void)mosq;

	struct akz_msg *m = take_inflight(d, mid);
	if(m == NULL) return;
	d->waiting_ack_since_ms = akz_mono_ms();
	settle(d, m);
	if(d->b->receipts) queue_receipt(d, m);
	free(m);
	count_relayed(d, 1);
}

static void on_connect(struct mosquitto *mosq, void *obj, int rc)
{
	struct dev *d = obj;
	struct akz_bridge *b = d->b;
	char topic[512];

	if(rc == 4 || rc == 5){
		char msg[160];
		snprintf(msg, sizeof(msg), "akenza refused the credentials (%s)", mosquitto_connack_string(rc));
		schedule_retry(d, ST_UNAUTHORIZED, msg);
		blog(b, d->news ? MOSQ_LOG_WARNING : MOSQ_LOG_DEBUG, "akenza: device '%s': %s: the public "
				"key with kid %s is probably not registered in akenza for this device (or this "
				"box's clock is off, which makes its tokens look expired or future-dated); "
				"retrying in minutes", d->id, msg, akz_key_kid(d->key));
		return;
	}
	if(rc != 0){
		schedule_retry(d, ST_BACKOFF, mosquitto_connack_string(rc));
		return;
	}
	d->failures = 0;
	d->ever_connected = true;
	SSL *ssl = mosquitto_ssl_get(mosq);
	/* Without the buffer (out of memory) every packet is its own write(2): slower, not wrong. */
	(void)akz_tlsio_attach(ssl);
	bool resumed = ssl && SSL_session_reused(ssl);
	pthread_mutex_lock(&b->lock);
	b->sum.connects++;
	if(resumed) b->sum.tls_resumed++;
	pthread_mutex_unlock(&b->lock);
	d->waiting_ack_since_ms = akz_mono_ms();
	snprintf(topic, sizeof(topic), AKZ_DOWN_PREFIX "%s/#", d->id);
	int src = mosquitto_subscribe(mosq, NULL, topic, 1);
	if(src != MOSQ_ERR_SUCCESS){
		blog(b, MOSQ_LOG_ERR, "akenza: device '%s': cannot subscribe to downlinks: %s",
				d->id, mosquitto_strerror(src));
	}
	/* Refresh at a random point late in the token's life, so that a fleet that connected in
	 * the same second does not refresh in the same second. */
	int64_t life_ms = b->lifetime * 1000;
	d->due_ms = akz_mono_ms() + random_between(life_ms * 70 / 100, life_ms * 90 / 100);
	d->last_log[0] = '\0';
	set_state(d, ST_CONNECTED, NULL);
}

/* The connection is gone (reported by libmosquitto or found by us): reconnect now (token
 * refresh) or after a backoff. QoS 1 uplinks in flight stay in libmosquitto's session and are
 * sent again after the reconnect; their window slots stay taken until their PUBACKs. */
static void lost_connection(struct dev *d, int rc)
{
	/* Failed before CONNACK (refused credentials end in another state): maybe this address. */
	if(d->state == ST_CONNECTING && d->addr[0]) akz_resolver_failed(d->b->resolver, d->addr);
	end_handshake(d);
	d->refreshing = false;
	if(d->state == ST_UNAUTHORIZED || d->state == ST_DISABLED || d->state == ST_BACKOFF) return;
	if(d->reconnect_now){
		d->reconnect_now = false;
		d->due_ms = akz_mono_ms();
		set_state(d, ST_CONNECTING, NULL);
		return;
	}
	char why[240];
	snprintf(why, sizeof(why), "%s%s%s", mosquitto_strerror(rc),
			d->last_log[0] ? ": " : "", d->last_log);
	schedule_retry(d, ST_BACKOFF, why);
}

static void on_disconnect(struct mosquitto *mosq, void *obj, int rc)
{
	struct dev *d = obj;
	(void)mosq;

	d->disconnect_seen = true;
	d->fd = -1;         /* libmosquitto closed it: it left the epoll set */
	d->events = 0;
	lost_connection(d, rc);
}

static void on_message(struct mosquitto *mosq, void *obj, const struct mosquitto_message *msg)
{
	struct dev *d = obj;
	struct akz_bridge *b = d->b;
	(void)mosq;

	/* Only this device's downlinks are relayed: a broker bug or a shared session must not let
	 * one device's messages reach another. */
	if(!akz_topic_is_for(msg->topic, AKZ_TOPIC_DOWN, d->id)){
		blog(b, MOSQ_LOG_WARNING, "akenza: device '%s': ignoring upstream message on foreign topic '%s'",
				d->id, msg->topic);
		return;
	}
	struct akz_msg *m = akz_msg_new(msg->topic, strlen(msg->topic), msg->payload,
			(uint32_t)msg->payloadlen, (uint8_t)msg->qos, NULL, 0);
	if(!queue_for_broker(b, m)){
		blog(b, MOSQ_LOG_ERR, "akenza: device '%s': downlink on '%s' dropped: the broker is not "
				"taking downlinks fast enough", d->id, msg->topic);
	}
}

static void on_log(struct mosquitto *mosq, void *obj, int level, const char *str)
{
	struct dev *d = obj;
	(void)mosq;
	if(level == MOSQ_LOG_ERR) snprintf(d->last_log, sizeof(d->last_log), "%s", str);
}

/* Creates the device's libmosquitto client. Returns 0, or -1 with the device in backoff. */
static int create_client(struct dev *d)
{
	struct akz_bridge *b = d->b;

	/* clean_session false: akenza keeps QoS 1 downlinks for the device while the link is down. */
	d->mosq = mosquitto_new(d->id, false, d);
	if(d->mosq == NULL){
		schedule_retry(d, ST_BACKOFF, "out of memory creating the upstream client");
		return -1;
	}
	akz_fds_close_pair(d->mosq);
	/* libmosquitto 2.0 defaults to applying its own settings on top of a given context, and
	 * then refuses to connect without a cafile: the context is complete, so switch that off. */
	mosquitto_int_option(d->mosq, MOSQ_OPT_SSL_CTX_WITH_DEFAULTS, 0);
	mosquitto_void_option(d->mosq, MOSQ_OPT_SSL_CTX, b->ssl_ctx);
	mosquitto_int_option(d->mosq, MOSQ_OPT_TCP_NODELAY, 1);
	mosquitto_int_option(d->mosq, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V311);
	mosquitto_max_inflight_messages_set(d->mosq, WINDOW);
	mosquitto_connect_callback_set(d->mosq, on_connect);
	mosquitto_disconnect_callback_set(d->mosq, on_disconnect);
	mosquitto_publish_callback_set(d->mosq, on_publish);
	mosquitto_message_callback_set(d->mosq, on_message);
	mosquitto_log_callback_set(d->mosq, on_log);
	return 0;
}

/* Mints a fresh token and starts connecting to the next upstream address. Never blocks on the
 * network: the name was looked up beforehand (resolver.c). */
static void start_connect(struct dev *d)
{
	struct akz_bridge *b = d->b;
	char err[256];

	if(d->mosq == NULL && create_client(d)) return;
	if(akz_resolver_pick(b->resolver, d->addr, err, sizeof(err)) != AKZ_RESOLVE_OK){
		d->addr[0] = '\0';
		schedule_retry(d, ST_BACKOFF, err);   /* PENDING does not get here: see sweep_device */
		return;
	}
	time_t now = time(NULL);
	char *token = akz_jwt_mint(d->key, d->id, now, b->lifetime, err, sizeof(err));
	if(token == NULL){
		schedule_retry(d, ST_BACKOFF, err);
		return;
	}
	int rc = mosquitto_username_pw_set(d->mosq, b->username, token);
	OPENSSL_cleanse(token, strlen(token));
	free(token);
	if(rc != MOSQ_ERR_SUCCESS){
		schedule_retry(d, ST_BACKOFF, mosquitto_strerror(rc));
		return;
	}
	d->minted_wall_offset = wall_offset_s();
	pthread_mutex_lock(&b->lock);
	d->status.token_expires = now + b->lifetime;
	pthread_mutex_unlock(&b->lock);
	d->last_log[0] = '\0';
	/* The connect closes any old socket (a zombie included) and opens a new one, which may
	 * get the same number: take the old one out of the epoll set first. */
	if(d->fd >= 0) epoll_ctl(b->epfd, EPOLL_CTL_DEL, d->fd, NULL);
	d->fd = -1;
	d->zombie_fd = -1;
	d->out_blocked = false;   /* the old connection's buffer goes with its SSL object */
	rc = mosquitto_connect_async(d->mosq, d->addr, b->port, b->keepalive);
	if(rc != MOSQ_ERR_SUCCESS){
		char why[300];
		snprintf(why, sizeof(why), "connect to %s (%s) port %d: %s", b->host, d->addr, b->port,
				rc == MOSQ_ERR_ERRNO ? strerror(errno) : mosquitto_strerror(rc));
		akz_resolver_failed(b->resolver, d->addr);
		schedule_retry(d, ST_BACKOFF, why);
		update_interest(d);
		return;
	}
	d->connect_deadline_ms = akz_mono_ms() + CONNECT_TIMEOUT_MS;
	b->last_connect_ms = akz_mono_ms();
	b->trim_due = true;
	d->handshaking = true;
	b->handshakes++;
	set_state(d, ST_CONNECTING, NULL);
	update_interest(d);
}

/* Takes the oldest pending uplink off the queue. Bridge thread. */
static struct akz_msg *pop_pending(struct dev *d)
{
	pthread_mutex_lock(&d->b->lock);
	struct akz_msg *m = akz_msgq_pop(&d->pending);
	pthread_mutex_unlock(&d->b->lock);
	if(m && m->seq) d->sent_upto = m->seq;
	return m;
}

/* Drops pending uplinks older than the TTL, oldest first (they are in arrival order), counting
 * them; one log line per device and sweep says how many went. Bridge thread. */
static void expire_pending(struct dev *d, int64_t wall_now)
{
	struct akz_bridge *b = d->b;
	size_t n = 0;

	if(b->ttl == 0) return;
	for(;;){
		pthread_mutex_lock(&b->lock);
		struct akz_msg *m = akz_msgq_peek(&d->pending);
		bool old = m && wall_now - m->time > b->ttl;
		pthread_mutex_unlock(&b->lock);
		if(!old) break;
		m = pop_pending(d);
		settle(d, m);
		free(m);
		n++;
	}
	if(n == 0) return;
	pthread_mutex_lock(&b->lock);
	d->unacked -= n;
	if(!d->removed) b->sum.queued -= n;
	b->sum.expired += n;
	b->sum_dirty = true;
	mark_dirty_locked(b, d);
	pthread_mutex_unlock(&b->lock);
	d->expired += n;
}

/* Puts d on b->flush if its write buffer holds records, to be written out at the end of the
 * loop turn (flush_outputs): a device's packets of one turn leave in one write(2). */
static void note_output(struct dev *d)
{
	if(d->in_flush || d->mosq == NULL || akz_tlsio_pending(mosquitto_ssl_get(d->mosq)) == 0) return;
	d->in_flush = true;
	d->flush_next = d->b->flush;
	d->b->flush = d;
}

/* Hands pending uplinks to libmosquitto while the window has room and the socket takes them:
 * QoS 1 ones wait in the window for their PUBACK, QoS 0 ones count as relayed once handed over.
 * Stopping while libmosquitto still has bytes to write keeps its queue, and our memory, small. */
static void pump_uplinks(struct dev *d)
{
	struct akz_bridge *b = d->b;
	size_t qos0 = 0;

	while(d->state == ST_CONNECTED && !d->refreshing && d->inflight < WINDOW
			&& !mosquitto_want_write(d->mosq)){
		pthread_mutex_lock(&b->lock);
		struct akz_msg *m = akz_msgq_peek(&d->pending);
		pthread_mutex_unlock(&b->lock);
		if(m == NULL) break;
		if(b->ttl && (int64_t)time(NULL) - m->time > b->ttl){
			expire_pending(d, (int64_t)time(NULL));
			continue;
		}
		int mid = 0;
		int qos = m->qos > 1 ? 1 : m->qos;   /* akenza takes QoS 0 and 1; 2 goes as 1 */
		int rc = mosquitto_publish(d->mosq, &mid, m->topic, (int)m->payloadlen, m->payload, qos, false);
		if(rc != MOSQ_ERR_SUCCESS){
			/* Left at the head of the queue: it goes with the next connection. */
			snprintf(d->last_log, sizeof(d->last_log), "publish: %s", mosquitto_strerror(rc));
			break;
		}
		m = pop_pending(d);
		if(qos == 1){
			for(int i = 0; i < WINDOW; i++){
				if(d->fl[i].m == NULL){
					d->fl[i] = (struct inflight){.mid = mid, .m = m};
					break;
				}
			}
			if(d->inflight++ == 0) d->waiting_ack_since_ms = akz_mono_ms();
		}else{
			settle(d, m);
			free(m);
			qos0++;
		}
	}
	if(qos0) count_relayed(d, qos0);
	note_output(d);
	update_interest(d);
}

/* Writes out one device's write buffer. Returns false if the connection failed (and was
 * dropped). A socket that takes only part gets EPOLLOUT interest until it has taken all. */
static bool flush_output(struct dev *d)
{
	if(d->mosq == NULL || d->fd < 0) return true;
	int rc = akz_tlsio_flush(mosquitto_ssl_get(d->mosq));
	if(rc < 0){
		char why[160];
		snprintf(why, sizeof(why), "write: %s", strerror(errno));
		drop_connection(d, why, MOSQ_ERR_ERRNO);
		return false;
	}
	bool blocked = rc == 0;
	if(blocked != d->out_blocked){
		d->out_blocked = blocked;
		update_interest(d);
	}
	return true;
}

/* Writes out the write buffers filled during this loop turn. */
static void flush_outputs(struct akz_bridge *b)
{
	while(b->flush){
		struct dev *d = b->flush;
		b->flush = d->flush_next;
		d->in_flush = false;
		flush_output(d);
	}
}

/* Applies what a registry sync changed for this device: enabled flag and key. */
static void apply_change(struct dev *d)
{
	struct akz_bridge *b = d->b;
	/* A reconnect asked for through the control API: connected devices reconnect as for a key
	 * change, waiting ones try again now with a fresh backoff. */
	pthread_mutex_lock(&b->lock);
	bool reconnect = d->reconnect_requested;
	d->reconnect_requested = false;
	pthread_mutex_unlock(&b->lock);
	if(reconnect && d->state == ST_CONNECTED){
		d->reconnect_now = true;
		check_socket(d, mosquitto_disconnect(d->mosq));
		if(d->state == ST_CONNECTED) drop_connection(d, "reconnect requested", MOSQ_ERR_SUCCESS);
	}else if(reconnect && (d->state == ST_BACKOFF || d->state == ST_UNAUTHORIZED)){
		d->failures = 0;
		d->due_ms = akz_mono_ms();
	}

	pthread_mutex_lock(&b->lock);
	bool enabled = d->enabled;
	struct akz_key *nk = d->next_key;
	d->next_key = NULL;
	d->changed = false;
	pthread_mutex_unlock(&b->lock);

	if(nk){
		akz_key_unref(d->key);
		d->key = nk;
		blog(b, MOSQ_LOG_NOTICE, "akenza: device '%s': key changed (kid %s): reconnecting",
				d->id, akz_key_kid(nk));
	}
	if(!enabled){
		if(d->state != ST_DISABLED){
			/* First the state, so that lost_connection leaves the device alone. */
			set_state(d, ST_DISABLED, NULL);
			if(d->mosq && mosquitto_socket(d->mosq) >= 0) drop_connection(d, "device disabled", MOSQ_ERR_SUCCESS);
		}
	}else if(d->state == ST_DISABLED || (nk && d->state != ST_CONNECTED)){
		d->failures = 0;
		d->due_ms = akz_mono_ms();
		set_state(d, ST_CONNECTING, NULL);
	}else if(nk && d->state == ST_CONNECTED){
		d->reconnect_now = true;
		check_socket(d, mosquitto_disconnect(d->mosq));
		if(d->state == ST_CONNECTED) drop_connection(d, "key changed", MOSQ_ERR_SUCCESS);
	}
	if(d->mosq) update_interest(d);
}

static int cmp_msg_seq(const void *a, const void *b)
{
	uint64_t x = (*(struct akz_msg *const *)a)->seq, y = (*(struct akz_msg *const *)b)->seq;
	return x < y ? -1 : x > y;
}

/* Hands a leaving device's undelivered spooled uplinks back to the spool, window first (in seq
 * order) then pending, so that they are sent in order if the device comes back. The rest is freed. */
static void give_back(struct dev *d)
{
	struct akz_msg *win[WINDOW] = {0};
	struct akz_msgq q = {0};
	size_t n = 0;

	for(int i = 0; i < WINDOW; i++){
		if(d->fl[i].m) win[n++] = d->fl[i].m;
		d->fl[i].m = NULL;
	}
	qsort(win, n, sizeof(struct akz_msg *), cmp_msg_seq);
	for(size_t i = 0; i < n; i++){
		if(win[i]->seq && d->sd) akz_msgq_push(&q, win[i]);
		else free(win[i]);
	}
	for(struct akz_msg *m; (m = akz_msgq_pop(&d->pending)) != NULL;){
		if(m->seq && d->sd) akz_msgq_push(&q, m);
		else free(m);
	}
	if(q.count) akz_spool_give_back(d->b->spool, d->sd, &q);
}

static void destroy_dev(struct dev *d)
{
	end_handshake(d);
	for(struct dev **pp = &d->b->reread; d->in_reread && *pp; pp = &(*pp)->reread_next){
		if(*pp == d){
			*pp = d->reread_next;
			break;
		}
	}
	for(struct dev **pp = &d->b->flush; d->in_flush && *pp; pp = &(*pp)->flush_next){
		if(*pp == d){
			*pp = d->flush_next;
			break;
		}
	}
	if(d->mosq){
		mosquitto_destroy(d->mosq);  /* closes the socket, which leaves the epoll set */
	}
	akz_key_unref(d->key);
	akz_key_unref(d->next_key);
	give_back(d);
	free(d->id);
	free(d);
}

/* A fleet starting together would make every device do a full TLS handshake, since none has a
 * session to resume yet: the first connection goes alone, and the others follow once it has
 * left a session (or after PILOT_MS). True while the others must wait. */
static bool pilot_holds(struct akz_bridge *b, int64_t now)
{
	if(b->pilot_done) return false;
	if(b->pilot_until == 0) return false;   /* nobody is connecting yet: this one is the pilot */
	if(akz_tls_has_session(b->ssl_ctx) || now >= b->pilot_until){
		b->pilot_done = true;
		return false;
	}
	return true;
}

/* Takes one connect permit from the token bucket; false when the rate is used up. */
static bool take_connect_permit(struct akz_bridge *b, int64_t now)
{
	b->bucket += (double)(now - b->bucket_ms) * b->connect_rate / 1000.0;
	b->bucket_ms = now;
	if(b->bucket > b->connect_rate) b->bucket = b->connect_rate;
	if(b->bucket < 1.0) return false;
	b->bucket -= 1.0;
	return true;
}

/* The periodic pass over a connected device: keepalive, token refresh, liveness. */
static void check_connected(struct dev *d, int64_t now, int64_t wall_off)
{
	struct akz_bridge *b = d->b;

	check_socket(d, mosquitto_loop_misc(d->mosq));
	if(d->state != ST_CONNECTED) return;   /* loop_misc may have found it dead */
	if(!d->refreshing){
		int64_t jump = wall_off - d->minted_wall_offset;
		if(jump > CLOCK_JUMP_S || jump < -CLOCK_JUMP_S){
			blog(b, MOSQ_LOG_WARNING, "akenza: device '%s': wall clock stepped by %" PRId64
					" s since its token was minted: refreshing the token now", d->id, jump);
			d->due_ms = now;
		}
		if(now >= d->due_ms){
			d->refreshing = true;
			d->drain_deadline_ms = now + REFRESH_DRAIN_MS;
		}
	}
	if(d->refreshing && (d->inflight == 0 || now >= d->drain_deadline_ms)){
		d->reconnect_now = true;
		check_socket(d, mosquitto_disconnect(d->mosq));
		if(d->state == ST_CONNECTED) drop_connection(d, "token refresh", MOSQ_ERR_SUCCESS);
		return;
	}
	/* Alive means acknowledged: a socket that takes uplinks and answers nothing is dead. */
	if(d->inflight > 0 && now - d->waiting_ack_since_ms > (int64_t)b->keepalive * 1000){
		blog(b, MOSQ_LOG_WARNING, "akenza: device '%s': no PUBACK for %d s: reconnecting",
				d->id, b->keepalive);
		drop_connection(d, "no PUBACK from akenza", MOSQ_ERR_KEEPALIVE);
	}
}

static void sweep_device(struct dev *d, int64_t now, int64_t wall_off)
{
	if(d->state != ST_CONNECTED) expire_pending(d, (int64_t)time(NULL));
	if(d->expired){
		blog(d->b, MOSQ_LOG_WARNING, "akenza: device '%s': %" PRIu64 " uplinks older than "
				"plugin_opt_spool_ttl (%" PRId64 " s) dropped undelivered", d->id, d->expired, d->b->ttl);
		d->expired = 0;
	}
	switch(d->state){
	case ST_DISABLED:
		break;
	case ST_CONNECTED:
		check_connected(d, now, wall_off);
		break;
	case ST_CONNECTING:
		if(d->fd >= 0){
			if(now >= d->connect_deadline_ms) drop_connection(d, "no CONNACK within 30 s", MOSQ_ERR_TIMEOUT);
			break;
		}
		/* fall through: waiting for the first attempt or a refresh reconnect */
		/* FALLTHROUGH */
	case ST_BACKOFF:
	case ST_UNAUTHORIZED:
		if(now < d->due_ms || pilot_holds(d->b, now)) break;
		/* Handshakes in flight are capped as well as started ones: each holds tens of KB of
		 * TLS buffers, and hundreds at once scatter the devices' long-lived objects over
		 * the heap, which keeps ~6 KB per device resident after the storm (measured: 22 KB
		 * per idle device uncapped, 16 KB with 64), at no cost in ramp time on a fast link. */
		if(d->b->handshakes >= d->b->max_handshakes){
			d->b->connects_held = true;
			break;
		}
		/* The first lookup of the upstream's name is under way: wait without using up a
		 * connect permit (the sweep comes back every 10 ms while connects are held). */
		if(akz_resolver_state(d->b->resolver) == AKZ_RESOLVE_PENDING){
			d->b->connects_held = true;
			break;
		}
		if(take_connect_permit(d->b, now)){
			if(d->b->pilot_until == 0) d->b->pilot_until = now + PILOT_MS;
			start_connect(d);
		}
		break;
	}
	if(d->mosq){
		note_output(d);
		update_interest(d);
	}
}

/* Tells whether the wall clock was stepped since the last sweep (NTP correcting a box that
 * booted without a real-time clock, say), and says so in the log. A wrong clock makes tokens
 * look expired or future-dated to akenza and certificates not yet valid to us, and the
 * devices it kept out wait minutes to retry: after the step they retry at once (at the
 * connect rate). Connected devices re-mint on their own (check_connected). Bridge thread. */
static bool clock_stepped(struct akz_bridge *b, int64_t wall_off)
{
	int64_t step = wall_off - b->wall_off;
	bool known = b->wall_off_known;
	b->wall_off = wall_off;
	b->wall_off_known = true;
	if(!known || (step <= CLOCK_JUMP_S && step >= -CLOCK_JUMP_S)) return false;
	blog(b, MOSQ_LOG_NOTICE, "akenza: the wall clock stepped by %" PRId64 " s: devices waiting to "
			"retry connect now", step);
	return true;
}

/* Once a minute while connections fail, one line on how many devices are out and why they are
 * waiting, since each device's repeated failures go to debug level (state_log_level). */
static void report_outage(struct akz_bridge *b, int64_t now)
{
	enum { REPORT_MS = 60000 };
	if(now - b->outage_report_ms < REPORT_MS) return;
	b->outage_report_ms = now;
	if(b->failed_since_report == 0) return;
	size_t n[ST_UNAUTHORIZED + 1] = {0}, all = 0;
	for(struct dev *d = b->devs; d; d = d->next, all++) n[d->state]++;
	blog(b, MOSQ_LOG_NOTICE, "akenza: %zu of %zu devices not connected (%zu in backoff, %zu "
			"unauthorized, %zu connecting, %zu disabled); %zu failed attempts in the last minute, "
			"the newest: %s (a device's repeated failures are logged at debug level)",
			all - n[ST_CONNECTED], all, n[ST_BACKOFF], n[ST_UNAUTHORIZED], n[ST_CONNECTING],
			n[ST_DISABLED], b->failed_since_report, b->last_failure);
	b->failed_since_report = 0;
}

/* Adopts new devices, applies changes, destroys removed ones, runs timers. */
static void sweep(struct akz_bridge *b, int64_t now)
{
	pthread_mutex_lock(&b->lock);
	struct dev *in = b->incoming;
	b->incoming = NULL;
	bool changes = b->changes;
	b->changes = false;
	pthread_mutex_unlock(&b->lock);

	while(in){
		struct dev *next = in->incoming_next;
		in->next = b->devs;
		b->devs = in;
		in = next;
	}
	int64_t wall_off = wall_offset_s();
	bool stepped = clock_stepped(b, wall_off);
	b->connects_held = false;
	for(struct dev **pp = &b->devs; *pp;){
		struct dev *d = *pp;
		if(stepped && (d->state == ST_BACKOFF || d->state == ST_UNAUTHORIZED)) d->due_ms = now;
		if(changes){
			pthread_mutex_lock(&b->lock);
			bool removed = d->removed, changed = d->changed, busy = d->in_ready || d->in_dirty;
			pthread_mutex_unlock(&b->lock);
			if(removed){
				if(busy){
					/* still on a hand-off list: try again next sweep */
					pthread_mutex_lock(&b->lock);
					b->changes = true;
					pthread_mutex_unlock(&b->lock);
					pp = &d->next;
					continue;
				}
				*pp = d->next;
				blog(b, MOSQ_LOG_NOTICE, "akenza: device '%s' left the bridge", d->id);
				destroy_dev(d);
				continue;
			}
			if(changed) apply_change(d);
		}
		sweep_device(d, now, wall_off);
		pp = &d->next;
	}
	report_outage(b, now);
	/* A connect storm leaves tens of KB per handshake in this thread's malloc arena, which
	 * glibc keeps: give it back once the storm is over, for edge boxes with little memory. */
	if(b->trim_due && now - b->last_connect_ms > TRIM_AFTER_MS){
		b->trim_due = false;
		malloc_trim(0);
	}
}

/* Hands new uplinks of the devices that got some to libmosquitto. Devices are taken off the
 * ready list one at a time under the lock: the broker thread may put a device back on it (and
 * rewrite its ready_next) the moment it is off, so the list is never walked unlocked. */
static void pump_ready(struct akz_bridge *b)
{
	pthread_mutex_lock(&b->lock);
	b->wake_pending = false;
	for(size_t n = 0; b->ready && n < READY_BATCH; n++){
		struct dev *d = b->ready;
		b->ready = d->ready_next;
		d->in_ready = false;
		pthread_mutex_unlock(&b->lock);
		/* No device on the list is freed before the next sweep, which this thread runs. */
		if(d->mosq) pump_uplinks(d);
		pthread_mutex_lock(&b->lock);
	}
	bool more = b->ready != NULL;   /* more next turn: do not starve the sockets */
	if(more) b->wake_pending = true;
	pthread_mutex_unlock(&b->lock);
	if(more) wake(b);
}

/* True if OpenSSL holds input of the device that libmosquitto has not taken yet. */
static bool tls_holds_input(struct dev *d)
{
	SSL *ssl = mosquitto_ssl_get(d->mosq);
	return ssl && SSL_has_pending(ssl) == 1;
}

/* Puts d on b->reread, to be read next loop turn whatever its socket says. */
static void queue_reread(struct dev *d)
{
	if(d->in_reread) return;
	d->in_reread = true;
	d->reread_next = d->b->reread;
	d->b->reread = d;
}

/* Reads what the device's socket and OpenSSL hold. With read-ahead (tls.c) OpenSSL keeps whole
 * records that libmosquitto has not asked for yet (it reads a packet count, not to the end),
 * and epoll cannot see them: reading goes on until none is left, or, after READ_ROUNDS calls
 * (a peer that keeps the link full), the device is read again next turn. */
static void read_socket(struct dev *d)
{
	check_socket(d, mosquitto_loop_read(d->mosq, WINDOW));
	for(int i = 0; d->fd >= 0 && tls_holds_input(d); i++){
		if(i == READ_ROUNDS){
			queue_reread(d);
			return;
		}
		check_socket(d, mosquitto_loop_read(d->mosq, WINDOW));
	}
}

static void handle_io(struct dev *d, uint32_t events)
{
	if(d->mosq == NULL || d->fd < 0) return;
	/* libmosquitto advances a TLS handshake only in loop_read, also when the handshake waits to
	 * write (loop_write does nothing then): while connecting, a writable socket is read too. */
	if(d->state == ST_CONNECTING) events |= EPOLLIN;
	if(events & (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP)){
		read_socket(d);
		/* During the TLS handshake libmosquitto takes a closed connection for "try again":
		 * with a level-triggered epoll that would spin, so the end is taken as final here. */
		if(d->fd >= 0 && d->state == ST_CONNECTING && (events & (EPOLLERR | EPOLLHUP | EPOLLRDHUP))){
			drop_connection(d, "connection closed during the handshake", MOSQ_ERR_CONN_LOST);
		}
	}
	if((events & EPOLLOUT) && d->fd >= 0 && (!d->out_blocked || flush_output(d))){
		check_socket(d, mosquitto_loop_write(d->mosq, WINDOW));
	}
	/* PUBACKs free window slots: refill them at once. */
	pump_uplinks(d);
}

/* Reads the devices that were left with input in OpenSSL last turn. */
static void reread_devices(struct akz_bridge *b)
{
	struct dev *d = b->reread;
	b->reread = NULL;
	while(d){
		struct dev *next = d->reread_next;
		d->in_reread = false;
		handle_io(d, EPOLLIN);
		d = next;
	}
}

static void *bridge_main(void *arg)
{
	struct akz_bridge *b = arg;
	struct epoll_event evs[256];

	b->bucket_ms = akz_mono_ms();
	b->next_sweep_ms = 0;
	while(!atomic_load(&b->stop)){
		int64_t now = akz_mono_ms();
		if(now >= b->next_sweep_ms){
			sweep(b, now);
			b->next_sweep_ms = now + (b->connects_held ? HELD_SWEEP_MS : SWEEP_MS);
		}
		int timeout = (int)(b->next_sweep_ms - now);
		int repoke = akz_wakeup_recheck(b->wakeup);
		if(repoke >= 0 && repoke < timeout) timeout = repoke;
		if(timeout < 0 || b->reread) timeout = 0;
		int n = epoll_wait(b->epfd, evs, (int)(sizeof(evs)/sizeof(evs[0])), timeout);
		if(n < 0 && errno != EINTR){
			blog(b, MOSQ_LOG_ERR, "akenza: bridge: epoll_wait: %s", strerror(errno));
			usleep(100000);
			continue;
		}
		for(int i = 0; i < n; i++){
			if(evs[i].data.ptr == NULL){
				uint64_t v;
				if(read(b->wakefd, &v, sizeof(v)) < 0 && errno != EAGAIN){
					blog(b, MOSQ_LOG_ERR, "akenza: bridge: eventfd: %s", strerror(errno));
				}
				continue;
			}
			struct dev *d = evs[i].data.ptr;
			if(d->mosq && (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP))){
				akz_tlsio_readable(mosquitto_ssl_get(d->mosq));
			}
			handle_io(d, evs[i].events);
		}
		reread_devices(b);
		pump_ready(b);
		flush_outputs(b);
	}
	return NULL;
}

static void wake(struct akz_bridge *b)
{
	uint64_t one = 1;
	if(write(b->wakefd, &one, sizeof(one)) < 0 && errno != EAGAIN){
		/* The bridge still runs its sweep every 100 ms: nothing waits for long. */
	}
}

/* ---- the broker-thread API ------------------------------------------------------------- */

/* Counts a refused uplink. */
static void count_refused(struct akz_bridge *b)
{
	pthread_mutex_lock(&b->lock);
	b->sum.refused++;
	b->sum_dirty = true;
	pthread_mutex_unlock(&b->lock);
}

enum akz_uplink_result akz_bridge_uplink(struct akz_bridge *b, const char *device_id,
		size_t idlen, const char *topic, const void *payload, uint32_t payloadlen, int qos,
		const void *corr, uint16_t corrlen)
{
	struct akz_msg *m = akz_msg_new(topic, strlen(topic), payload, payloadlen, (uint8_t)qos,
			corr, corrlen);
	if(m == NULL) return AKZ_UPLINK_NOMEM;

	pthread_mutex_lock(&b->lock);
	struct dev *d = find_locked(b, device_id, idlen);
	if(d == NULL || !d->enabled){
		pthread_mutex_unlock(&b->lock);
		free(m);
		return AKZ_UPLINK_UNKNOWN;
	}
	bool full = d->unacked >= b->queue_max;
	struct akz_spool_dev *sd = d->sd;
	pthread_mutex_unlock(&b->lock);
	if(full){
		count_refused(b);
		free(m);
		return AKZ_UPLINK_FULL;
	}
	/* On disk before the broker acknowledges it. Only this thread appends and only this thread
	 * removes devices, so d stays valid and seqs follow the queue order. */
	if(sd && (qos > 0 || b->spool_qos0)){
		enum akz_spool_rc rc = akz_spool_append(b->spool, sd, m);
		if(rc != AKZ_SPOOL_OK){
			count_refused(b);
			free(m);
			return rc == AKZ_SPOOL_IO ? AKZ_UPLINK_SPOOL_IO : AKZ_UPLINK_SPOOL_FULL;
		}
	}
	pthread_mutex_lock(&b->lock);
	akz_msgq_push(&d->pending, m);
	d->unacked++;
	b->sum.queued++;
	b->sum_dirty = true;
	if(!d->in_ready){
		d->in_ready = true;
		d->ready_next = b->ready;
		b->ready = d;
	}
	bool need_wake = !b->wake_pending;
	b->wake_pending = true;
	pthread_mutex_unlock(&b->lock);
	/* While TICKs come (every broker loop turn), the bridge thread is woken at the end of the
	 * turn, once for all the uplinks the turn brought: a wake per uplink cost an eventfd write,
	 * an epoll_wait and a thread switch per message. Without recent TICKs (an idle broker's
	 * first message, or per_listener_settings true, where 2.0.11 calls none) it is woken now. */
	if(need_wake){
		if(akz_mono_ms() - b->last_tick_ms <= TICK_RECENT_MS) b->wake_at_tick = true;
		else wake(b);
	}
	return AKZ_UPLINK_QUEUED;
}

/* A new device for the bridge thread to adopt. NULL when out of memory. */
static struct dev *new_dev(struct akz_bridge *b, const struct akz_device *rd)
{
	struct dev *d = calloc(1, sizeof(*d));
	if(d == NULL) return NULL;
	d->id = strdup(rd->id);
	if(d->id == NULL){
		free(d);
		return NULL;
	}
	d->b = b;
	d->fd = -1;
	d->zombie_fd = -1;
	d->enabled = rd->enabled;
	d->key = akz_key_ref(rd->key);
	if(b->spool){
		d->sd = akz_spool_device(b->spool, rd->id, strlen(rd->id));
		if(d->sd == NULL){
			akz_key_unref(d->key);
			free(d->id);
			free(d);
			return NULL;
		}
		/* What the spool recovered for it goes first, in the order the device sent it. */
		akz_spool_take_backlog(b->spool, d->sd, &d->pending);
		d->unacked = d->pending.count;
		if(d->pending.head) d->sent_upto = d->pending.head->seq - 1;
	}
	d->state = rd->enabled ? ST_CONNECTING : ST_DISABLED;
	d->status.state = state_names[d->state];
	d->status.since = time(NULL);
	snprintf(d->status.kid, sizeof(d->status.kid), "%s", akz_key_kid(rd->key));
	/* Spread the first connects of a fleet over the rate limiter rather than all at once. */
	d->due_ms = akz_mono_ms();
	return d;
}

/* Records a registry change of an existing device. Caller holds b->lock. */
static void note_change_locked(struct akz_bridge *b, struct dev *d, const struct akz_device *rd)
{
	const char *kid = akz_key_kid(rd->key);
	bool key_changed = strcmp(d->status.kid, kid) != 0;

	if(d->enabled == rd->enabled && !key_changed) return;
	d->enabled = rd->enabled;
	if(key_changed){
		akz_key_unref(d->next_key);
		d->next_key = akz_key_ref(rd->key);
		snprintf(d->status.kid, sizeof(d->status.kid), "%s", kid);
	}
	d->changed = true;
	b->changes = true;
}

struct orphans {
	const struct akz_registry *reg;
	uint64_t msgs;
};

/* Logs a device the spool holds uplinks for that the registry does not have: they are kept (the
 * device may come back), not deleted behind the operator's back. Runs under the spool's lock:
 * takes no bridge lock. Broker thread. */
static void report_orphan(void *ctx, const char *id, uint64_t bytes, uint64_t msgs)
{
	struct orphans *o = ctx;
	const struct akz_device *rd = akz_registry_find_device(o->reg, id);
	if(rd && rd->enabled) return;
	o->msgs += msgs;
	mosquitto_log_printf(MOSQ_LOG_WARNING, "akenza: spool holds %" PRIu64 " undelivered uplinks (%"
			PRIu64 " bytes) of device '%s', which is %s: kept until it is back", msgs, bytes, id,
			rd ? "disabled" : "not in the registry");
}

/* Makes room under the open-file limit for n devices: each has its upstream connection (and
 * libmosquitto's socket pair, when it could not be closed) and, as a rule, a local client; the
 * headroom is for listeners, the spool, logs and administrators. Raises the soft limit when it
 * is lower (systemd starts services at 1,024) and says in the log what it did, or what will fail:
 * devices past the limit cannot connect ("Too many open files"), and neither can sensors. Only
 * the upstream part is certain (gateways publish for many devices over one connection), so only
 * a limit below it is a warning. Broker thread. */
static void reserve_fds(struct akz_bridge *b, size_t ndevices)
{
	enum { HEADROOM = 256 };
	size_t upstream = ndevices * (size_t)akz_fds_per_device() + HEADROOM;
	size_t want = upstream + ndevices;
	size_t before, after;
	(void)akz_fds_reserve(want, &before, &after);
	if(after > before){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "akenza: raised the open-file limit from %zu to %zu "
				"for %zu devices", before, after, ndevices);
	}
	/* A tight limit is told once per device count and limit, not at every reload. */
	if(after >= want || (ndevices == b->fds_told_devices && after == b->fds_told_limit)) return;
	b->fds_told_devices = ndevices;
	b->fds_told_limit = after;
	if(after < upstream){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "akenza: the open-file limit (%zu) is below the %zu "
				"that the upstream connections of %zu devices need: devices past it cannot connect; "
				"raise the broker's hard limit (ulimit -n, systemd LimitNOFILE=)", after, upstream,
				ndevices);
	}else{
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "akenza: the open-file limit (%zu) leaves room for %zu "
				"local clients beside the upstream connections of %zu devices", after, after - upstream,
				ndevices);
	}
}

int akz_bridge_sync(struct akz_bridge *b, const struct akz_registry *reg)
{
	size_t n = akz_registry_device_count(reg);
	struct dev *fresh = NULL;
	size_t nfresh = 0;

	reserve_fds(b, n);

	/* Allocate everything first, so that running out of memory changes nothing. */
	for(size_t i = 0; i < n; i++){
		const struct akz_device *rd = akz_registry_device_at(reg, i);
		pthread_mutex_lock(&b->lock);
		bool known = find_locked(b, rd->id, strlen(rd->id)) != NULL;
		pthread_mutex_unlock(&b->lock);
		if(known) continue;
		struct dev *d = new_dev(b, rd);
		if(d == NULL) goto nomem;
		d->incoming_next = fresh;
		fresh = d;
		nfresh++;
	}
	pthread_mutex_lock(&b->lock);
	if(reserve_locked(b, b->ndevs + nfresh)){
		pthread_mutex_unlock(&b->lock);
		goto nomem;
	}
	/* Devices the registry no longer has leave the table; the bridge thread frees them. */
	for(size_t i = 0; i < b->nbuckets; i++){
		for(struct dev *d = b->buckets[i], *next; d; d = next){
			next = d->hnext;
			if(akz_registry_find_device(reg, d->id) == NULL){
				unlink_locked(b, d);
				d->removed = true;
				b->changes = true;
				size_t dropped = d->unacked;
				b->sum.queued -= dropped;
				b->sum.devices--;
				if(d->status.state && strcmp(d->status.state, "connected") == 0) b->sum.connected--;
				if(dropped){
					mosquitto_log_printf(MOSQ_LOG_WARNING, "akenza: device '%s' removed with %zu "
							"uplinks not yet acknowledged by akenza: %s", d->id, dropped, b->spool
							? "the spool keeps them until it comes back" : "they are discarded");
				}
				akz_status_clear_device(d->id);
			}
		}
	}
	for(size_t i = 0; i < n; i++){
		const struct akz_device *rd = akz_registry_device_at(reg, i);
		struct dev *d = find_locked(b, rd->id, strlen(rd->id));
		if(d) note_change_locked(b, d, rd);
	}
	while(fresh){
		struct dev *d = fresh;
		fresh = d->incoming_next;
		insert_locked(b, d);
		d->incoming_next = b->incoming;
		b->incoming = d;
		b->sum.devices++;
		b->sum.queued += d->unacked;
		mark_dirty_locked(b, d);
	}
	pthread_mutex_unlock(&b->lock);
	wake(b);
	if(b->spool){
		struct orphans o = {.reg = reg};
		akz_spool_each_backlog(b->spool, report_orphan, &o);
		pthread_mutex_lock(&b->lock);
		b->sum.orphaned = o.msgs;
		pthread_mutex_unlock(&b->lock);
	}
	return 0;

nomem:
	while(fresh){
		struct dev *d = fresh;
		fresh = d->incoming_next;
		destroy_dev(d);
	}
	return -1;
}

/* Publishes the status of devices whose state changed, at most once per interval each. */
static void publish_statuses(struct akz_bridge *b, int64_t now)
{
	struct akz_status_dev snaps[64];
	struct akz_spool_dev *sds[64];
	char ids[64][AKZ_STATUS_ID_MAX];
	size_t nsnap = 0;
	struct akz_spool_stats spool = {0};

	/* Lock order: the spool's lock is never taken under the bridge's (the spool logs through
	 * blog, which takes the bridge's lock, while holding its own). */
	if(b->spool) akz_spool_get_stats(b->spool, &spool);
	pthread_mutex_lock(&b->lock);
	for(struct dev **pp = &b->dirty; *pp && nsnap < 64;){
		struct dev *d = *pp;
		if(!d->removed && now - d->status_published_ms < b->status_interval_ms){
			pp = &d->dirty_next;
			continue;
		}
		*pp = d->dirty_next;
		d->in_dirty = false;
		if(d->removed) continue;
		d->status_published_ms = now;
		snaps[nsnap] = d->status;
		snaps[nsnap].queued = d->unacked;
		sds[nsnap] = d->sd;   /* spool shares live as long as the spool */
		snprintf(ids[nsnap], sizeof(ids[nsnap]), "%s", d->id);
		nsnap++;
	}
	struct akz_status_summary s = b->sum;
	s.spool = spool;
	/* The spool changes on its own too (the flusher reclaims space): publish that as well. */
	if(memcmp(&s.spool, &b->sum.spool, sizeof(s.spool)) != 0) b->sum_dirty = true;
	bool sum = b->sum_dirty && now - b->sum_published_ms >= b->status_interval_ms;
	if(sum){
		b->sum_dirty = false;
		b->sum_published_ms = now;
		b->sum.spool = s.spool;
	}
	pthread_mutex_unlock(&b->lock);

	for(size_t i = 0; i < nsnap; i++){
		if(sds[i]) akz_spool_device_usage(b->spool, sds[i], &snaps[i].spool_bytes, &snaps[i].spool_msgs);
		akz_status_publish_device(ids[i], &snaps[i]);
	}
	if(sum) akz_status_publish_summary(&s);
}

/* Writes queued log lines through the broker's logger. */
static void flush_log(struct akz_bridge *b)
{
	pthread_mutex_lock(&b->log_lock);
	struct log_line *l = b->log_head;
	size_t dropped = b->log_dropped;
	b->log_head = b->log_tail = NULL;
	b->log_count = 0;
	b->log_dropped = 0;
	pthread_mutex_unlock(&b->log_lock);

	while(l){
		struct log_line *next = l->next;
		mosquitto_log_printf(l->level, "%s", l->text);
		free(l);
		l = next;
	}
	if(dropped){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "akenza: %zu bridge log lines dropped", dropped);
	}
}

/* Publishes what the bridge thread handed over. Broker thread. Returns how many went out. */
static size_t publish_handed_over(struct akz_bridge *b)
{
	struct akz_msgq down = {0};

	pthread_mutex_lock(&b->lock);
	akz_msgq_take_all(&down, &b->down);
	pthread_mutex_unlock(&b->lock);

	size_t relayed = 0;
	for(struct akz_msg *m; (m = akz_msgq_pop(&down)) != NULL; free(m)){
		mosquitto_property *props = NULL;
		if(m->corrlen && mosquitto_property_add_binary(&props, MQTT_PROP_CORRELATION_DATA, m->corr,
				m->corrlen) != MOSQ_ERR_SUCCESS){
			mosquitto_property_free_all(&props);
		}
		int rc = mosquitto_broker_publish_copy(NULL, m->topic, (int)m->payloadlen, m->payload,
				m->qos, false, props);
		if(rc == MOSQ_ERR_SUCCESS){
			relayed++;   /* the broker owns props now */
		}else{
			mosquitto_property_free_all(&props);
			mosquitto_log_printf(MOSQ_LOG_ERR, "akenza: message on '%s' not published: %s",
					m->topic, mosquitto_strerror(rc));
		}
	}
	return relayed;
}

void akz_bridge_tick(struct akz_bridge *b)
{
	b->last_tick_ms = akz_mono_ms();
	if(b->wake_at_tick){
		b->wake_at_tick = false;
		wake(b);
	}
	/* Acknowledged first, so that a downlink handed over from here on signals again. What
	 * arrives while this TICK publishes is taken by the next pass; a signal that lands between
	 * the last pass and the broker's epoll_wait is spent, and the bridge thread sends it again
	 * when this acknowledgement does not follow within a few ms (akz_wakeup_recheck). */
	akz_wakeup_ack(b->wakeup);
	size_t relayed = 0;
	for(int pass = 0; pass < 4; pass++){
		size_t n = publish_handed_over(b);
		if(n == 0) break;
		relayed += n;
	}
	if(relayed){
		pthread_mutex_lock(&b->lock);
		b->sum.downlinks += relayed;
		b->sum_dirty = true;
		pthread_mutex_unlock(&b->lock);
	}
	flush_log(b);
	publish_statuses(b, akz_mono_ms());
}

void akz_bridge_check_tick(struct akz_bridge *b)
{
	/* A broker that calls TICK does so within 100 ms of starting its loop. */
	enum { NO_TICK_MS = 2000 };
	if(b == NULL || b->last_tick_ms) return;
	if(!b->no_tick_reported && akz_mono_ms() - b->started_ms >= NO_TICK_MS){
		b->no_tick_reported = true;
		mosquitto_log_printf(MOSQ_LOG_ERR, "akenza: the broker has not called the plugin's TICK "
				"since it started, as Mosquitto 2.0 does with per_listener_settings true: "
				"downlinks, delivery receipts and status topics cannot be published (uplinks "
				"still go out); set per_listener_settings false");
	}
	flush_log(b);
}

/* ---- control API hooks (broker thread) ---------------------------------------------------- */

int akz_bridge_device_status(struct akz_bridge *b, const char *id, struct akz_status_dev *out)
{
	struct akz_spool_dev *sd = NULL;
	pthread_mutex_lock(&b->lock);
	struct dev *d = find_locked(b, id, strlen(id));
	if(d){
		*out = d->status;
		out->queued = d->unacked;
		sd = d->sd;
	}
	pthread_mutex_unlock(&b->lock);
	/* After the bridge's lock: see publish_statuses on lock order. */
	if(sd) akz_spool_device_usage(b->spool, sd, &out->spool_bytes, &out->spool_msgs);
	return d ? 0 : -1;
}

int akz_bridge_reconnect(struct akz_bridge *b, const char *id)
{
	pthread_mutex_lock(&b->lock);
	struct dev *d = find_locked(b, id, strlen(id));
	bool ok = d && d->enabled;
	if(ok){
		/* The bridge thread acts on it in its next sweep, as on any registry change. */
		d->reconnect_requested = true;
		d->changed = true;
		b->changes = true;
	}
	pthread_mutex_unlock(&b->lock);
	if(ok) wake(b);
	return ok ? 0 : -1;
}

void akz_bridge_summary(struct akz_bridge *b, struct akz_status_summary *out)
{
	pthread_mutex_lock(&b->lock);
	*out = b->sum;
	pthread_mutex_unlock(&b->lock);
	if(b->spool) akz_spool_get_stats(b->spool, &out->spool);
}

/* ---- start and stop ------------------------------------------------------------------------- */

static void free_bridge(struct akz_bridge *b)
{
	while(b->devs){
		struct dev *d = b->devs;
		b->devs = d->next;
		destroy_dev(d);
	}
	while(b->incoming){
		struct dev *d = b->incoming;
		b->incoming = d->incoming_next;
		destroy_dev(d);
	}
	/* Removed devices the thread had not yet freed are still on b->devs; nothing else holds one. */
	akz_msgq_clear(&b->down);
	akz_spool_close(b->spool);
	akz_wakeup_free(b->wakeup);   /* every thread that pokes it has stopped */
	akz_resolver_free(b->resolver);
	flush_log(b);
	if(b->epfd >= 0) close(b->epfd);
	if(b->wakefd >= 0) close(b->wakefd);
	SSL_CTX_free(b->ssl_ctx);
	pthread_mutex_destroy(&b->lock);
	pthread_mutex_destroy(&b->log_lock);
	free(b->buckets);
	free(b->host);
	free(b->username);
	free(b->receipts_prefix);
	free(b);
}

/* The spool's log lines go through the bridge's queue: the flusher thread must not call the
 * broker's logger. At open (broker thread) the queue is flushed right after. */
static void spool_log(void *ctx, int level, const char *msg)
{
	blog(ctx, level, "%s", msg);
}

static int open_spool(struct akz_bridge *b, const struct akz_config *cfg, char *err, size_t errlen)
{
	struct akz_spool_opts o = {
		.dir = cfg->spool_dir,
		.sync = AKZ_SYNC_BATCH,
		.sync_ms = cfg->spool_sync_ms,
		.max_bytes = (uint64_t)cfg->spool_max_bytes,
		.device_max_bytes = (uint64_t)cfg->spool_device_max_bytes,
		.segment_bytes = (uint64_t)cfg->spool_segment_bytes,
	};
	if(cfg->spool_sync) akz_spool_sync_parse(cfg->spool_sync, &o.sync);
	int rc = akz_spool_open(&o, spool_log, b, &b->spool, err, errlen);
	flush_log(b);
	if(rc == 0){
		struct akz_spool_stats st;
		akz_spool_get_stats(b->spool, &st);
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "akenza: spool %s (sync %s): %" PRIu64 " undelivered "
				"uplinks (%" PRIu64 " bytes) recovered in %" PRIu64 " segments", cfg->spool_dir,
				cfg->spool_sync, st.msgs, st.bytes, st.segments);
	}
	return rc;
}

int akz_bridge_start(const struct akz_config *cfg, struct akz_bridge **out, char *err, size_t errlen)
{
	*out = NULL;
	struct akz_bridge *b = calloc(1, sizeof(*b));
	if(b == NULL){
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	b->epfd = b->wakefd = -1;
	b->started_ms = akz_mono_ms();
	pthread_mutex_init(&b->lock, NULL);
	pthread_mutex_init(&b->log_lock, NULL);
	b->host = strdup(cfg->upstream_host);
	b->username = strdup(cfg->upstream_username);
	b->port = cfg->upstream_port;
	b->keepalive = cfg->upstream_keepalive;
	b->lifetime = cfg->token_lifetime;
	b->connect_rate = cfg->connect_rate;
	b->max_handshakes = cfg->connect_concurrency;
	b->queue_max = cfg->queue_max ? (size_t)cfg->queue_max : cfg->spool_dir ? SIZE_MAX : 1000;
	b->ttl = cfg->uplink_ttl;
	b->spool_qos0 = cfg->spool_qos0;
	b->receipts = cfg->receipts;
	b->receipts_prefix = strdup(cfg->receipts_prefix ? cfg->receipts_prefix : "akenza/receipts/");
	b->status_interval_ms = cfg->status_interval_ms;
	if(b->host == NULL || b->username == NULL || b->receipts_prefix == NULL){
		snprintf(err, errlen, "out of memory");
		goto fail;
	}
	if(cfg->spool_dir && open_spool(b, cfg, err, errlen)) goto fail;
	mosquitto_lib_init();
	if(!akz_fds_probe_pair()){
		mosquitto_log_printf(MOSQ_LOG_INFO, "akenza: this libmosquitto's socket pair was not found "
				"where expected: each device keeps it and uses three file descriptors");
	}
	b->ssl_ctx = akz_tls_client_ctx(cfg->upstream_host, cfg->upstream_cafile, cfg->upstream_capath,
			cfg->upstream_tls_version, err, errlen);
	if(b->ssl_ctx == NULL) goto fail;
	if(akz_resolver_new(cfg->upstream_host, cfg->upstream_dns_refresh, &b->resolver, err, errlen)) goto fail;
	b->epfd = epoll_create1(EPOLL_CLOEXEC);
	b->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if(b->epfd < 0 || b->wakefd < 0){
		snprintf(err, errlen, "epoll/eventfd: %s", strerror(errno));
		goto fail;
	}
	struct epoll_event e = {.events = EPOLLIN, .data.ptr = NULL};
	if(epoll_ctl(b->epfd, EPOLL_CTL_ADD, b->wakefd, &e)){
		snprintf(err, errlen, "epoll_ctl: %s", strerror(errno));
		goto fail;
	}
	if(cfg->downlink_wakeup && strcmp(cfg->downlink_wakeup, "signal") == 0){
		char why[200];
		if(akz_wakeup_new(&b->wakeup, why, sizeof(why))){
			mosquitto_log_printf(MOSQ_LOG_WARNING, "akenza: plugin_opt_downlink_wakeup signal: %s: "
					"downlinks wait for the broker's TICK (up to 100 ms)", why);
		}
	}
	int rc = akz_thread_start(&b->thread, bridge_main, b);
	if(rc){
		snprintf(err, errlen, "cannot start the bridge thread: %s", strerror(rc));
		goto fail;
	}
	b->thread_started = true;
	*out = b;
	return 0;
fail:
	free_bridge(b);
	return -1;
}

void akz_bridge_stop(struct akz_bridge *b)
{
	if(b == NULL) return;
	if(b->thread_started){
		atomic_store(&b->stop, true);
		wake(b);
		pthread_join(b->thread, NULL);
	}
	size_t unacked = 0;
	for(struct dev *d = b->devs; d; d = d->next) unacked += d->unacked;
	if(unacked && b->spool){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "akenza: stopping with %zu uplinks not yet "
				"acknowledged by akenza: they stay in the spool and go out after the restart", unacked);
	}else if(unacked){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "akenza: stopping with %zu uplinks not yet "
				"acknowledged by akenza (in-memory queue: they are lost)", unacked);
	}
	free_bridge(b);
}
