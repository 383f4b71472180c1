/* bridge_loop.c - the bridge thread: one epoll loop drives every device's akenza connection. */
#include <errno.h>
#include <malloc.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <mosquitto.h>
#include "akz_bridge_int.h"
#include "akz_fds.h"
#include "akz_jwt.h"
#include "akz_keythread.h"
#include "akz_queue.h"
#include "akz_resolver.h"
#include "akz_spool.h"
#include "akz_tls.h"
#include "akz_topic.h"
#include "akz_util.h"
#include "akz_wakeup.h"
#include "akz_tlsio.h"

#define SWEEP_MS 100              /* timer resolution of the bridge thread */
#define SWEEP_SPREAD 10           /* a connected device's timers are looked at every this many sweeps */
#define CONNECT_TIMEOUT_MS 30000  /* from TCP connect to CONNACK */
#define REFRESH_DRAIN_MS 2000     /* wait for PUBACKs before a token refresh reconnects */
#define BACKOFF_MIN_MS 1000
#define BACKOFF_MAX_MS 120000
#define UNAUTH_MIN_MS 60000       /* a refused key is not fixed in seconds: ask again in minutes */
#define UNAUTH_MAX_MS 900000
#define CLOCK_JUMP_S 30           /* a wall-clock step larger than this re-mints the token */
#define DOWN_MAX 10000            /* downlinks waiting for the broker thread */
#define READY_BATCH 4096          /* devices pumped per loop turn before sockets get a look */
#define TRIM_AFTER_MS 5000        /* quiet time after connects before memory is given back */
#define READ_ROUNDS 64            /* loop_read calls per device and turn while OpenSSL holds input */
#define HELD_SWEEP_MS 10          /* sweep interval while connects wait for a handshake slot */
#define COALESCE_MAX_BYTES 8192   /* held uplinks this large go at once */
#define REFILL_MIN (WINDOW / 4)  /* free window slots worth a write of their own */
#define HOLD_OVERHEAD 64          /* bytes an uplink adds to its payload: topic, MQTT, TLS */
#define LOAD_WINDOW_US 10000      /* the edge's uplink rate is taken over this long at least */
#define PILOT_MS 2000             /* longest wait for the first TLS session before the others */

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

/* ---- state changes ------------------------------------------------------------------- */

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
		d->status.state = bridge_state_names[st];
		d->status.since = time(NULL);
	}
	if(error){
		snprintf(d->status.last_error, sizeof(d->status.last_error), "%s", error);
	}
	bridge_mark_dirty_locked(b, d);
	pthread_mutex_unlock(&b->lock);
	if(changed){
		bridge_log(b, state_log_level(d, st), "akenza: device '%s': %s%s%s", d->id,
				bridge_state_names[st], error ? ": " : "", error ? error : "");
	}
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
			bridge_log(b, MOSQ_LOG_ERR, "akenza: device '%s': epoll_ctl: %s", d->id, strerror(errno));
		}
	}else if(fd >= 0 && ev != d->events){
		struct epoll_event e = {.events = ev, .data.ptr = d};
		if(epoll_ctl(b->epfd, EPOLL_CTL_MOD, fd, &e) == 0) d->events = ev;
	}
}

static void lost_connection(struct dev *d, int rc);

/* Sends DISCONNECT. libmosquitto 2.1 shuts the socket down right after writing it (2.0 closed it
 * through SSL_shutdown, whose flush wrote the buffer out), so it must not wait in the write
 * buffer. Returns mosquitto_disconnect's result. */
static int disconnect_upstream(struct dev *d)
{
	(void)akz_tlsio_unbuffer(mosquitto_ssl_get(d->mosq));   /* a failure shows in the write */
	return mosquitto_disconnect(d->mosq);
}

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

_Static_assert((WINDOW & (WINDOW - 1)) == 0, "WINDOW must be a power of two");

/* The slot where the uplink with this mid is put, if free, and looked for first: libmosquitto
 * numbers a connection's packets in sequence, so the window's mids rarely collide there. */
static int home_slot(int mid)
{
	return (int)((unsigned)mid & (WINDOW - 1));
}

/* Puts m, handed to libmosquitto as mid, in a free window slot. The caller has checked that
 * d->inflight < WINDOW, so there is one. Never fails. */
static void put_inflight(struct dev *d, int mid, struct akz_msg *m)
{
	int i = home_slot(mid);
	for(int n = 0; d->fl[i].m && n < WINDOW; n++) i = (i + 1) & (WINDOW - 1);
	d->fl[i] = (struct inflight){.mid = mid, .m = m};
	if(d->inflight++ == 0) d->waiting_ack_since_ms = akz_mono_ms();
}

/* Frees the window slot of mid. Returns its uplink (the caller owns it), or NULL if mid was not
 * one of ours (QoS 0 uplinks and the subscription also end up in on_publish). */
static struct akz_msg *take_inflight(struct dev *d, int mid)
{
	for(int n = 0, i = home_slot(mid); n < WINDOW; n++, i = (i + 1) & (WINDOW - 1)){
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
		bridge_log(b, MOSQ_LOG_ERR, "akenza: device '%s': receipt for uplink %" PRIu64 " dropped: the "
				"broker is not taking messages fast enough", d->id, m->seq);
	}
}

/* Counts uplinks as delivered: acknowledged by akenza (QoS 1) or written (QoS 0). Caller
 * holds b->lock. */
static void count_relayed_locked(struct dev *d, size_t n)
{
	d->unacked -= n;
	d->b->sum.uplinks += n;
	if(!d->removed) d->b->sum.queued -= n;
	d->b->sum_dirty = true;
}

/* count_relayed_locked, taking the lock. */
static void count_relayed(struct dev *d, size_t n)
{
	pthread_mutex_lock(&d->b->lock);
	count_relayed_locked(d, n);
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
		bridge_log(b, d->news ? MOSQ_LOG_WARNING : MOSQ_LOG_DEBUG, "akenza: device '%s': %s: the public "
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
		bridge_log(b, MOSQ_LOG_ERR, "akenza: device '%s': cannot subscribe to downlinks: %s",
				d->id, mosquitto_strerror(src));
	}
	/* Refresh at a random point late in the token's life, so that a fleet that connected in
	 * the same second does not refresh in the same second. */
	int64_t life_ms = b->lifetime * 1000;
	d->due_ms = akz_mono_ms() + random_between(life_ms * 70 / 100, life_ms * 90 / 100);
	d->last_log[0] = '\0';
	/* libmosquitto formats a log line into a fresh malloc for every packet it sends or gets,
	 * whatever its level, as long as a log callback is set: two per relayed uplink. What we
	 * keep from it (the reason a TLS handshake or connect failed) comes before CONNACK, so the
	 * callback goes now and comes back with the next connect. */
	mosquitto_log_callback_set(mosq, NULL);
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
		bridge_log(b, MOSQ_LOG_WARNING, "akenza: device '%s': ignoring upstream message on foreign topic '%s'",
				d->id, msg->topic);
		return;
	}
	struct akz_msg *m = akz_msg_new(msg->topic, strlen(msg->topic), msg->payload,
			(uint32_t)msg->payloadlen, (uint8_t)msg->qos, NULL, 0);
	if(!queue_for_broker(b, m)){
		bridge_log(b, MOSQ_LOG_ERR, "akenza: device '%s': downlink on '%s' dropped: the broker is not "
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
	return 0;
}

/* The device's next token (akz_mint_poll): signed on the key thread for a key in a TPM, which
 * may be slow or stop answering (neither may stall this thread); DONE at once for a key in
 * memory, which start_connect signs itself. */
static enum akz_mint_rc poll_token(struct dev *d, char *err, size_t errlen)
{
	return akz_mint_poll(&d->mint, d->key, d->b->audience, d->id, d->b->lifetime, akz_keythread_timeout_ms(),
			err, errlen);
}

/* True while the device's token is being signed, or after that failed (the device is then in
 * backoff): its connect waits, without taking a connect permit. */
static bool token_pending(struct dev *d)
{
	char err[512];
	switch(poll_token(d, err, sizeof(err))){
	case AKZ_MINT_DONE: return false;
	case AKZ_MINT_PENDING: return true;
	case AKZ_MINT_FAILED: break;
	}
	schedule_retry(d, ST_BACKOFF, err);
	return true;
}

/* Mints a fresh token (or takes the one token_pending had made) and starts connecting to the
 * next upstream address. Never blocks on the network: the name was looked up beforehand
 * (resolver.c). */
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
	time_t iat;
	char *token = akz_mint_take(&d->mint, d->key, b->audience, d->id, time(NULL), b->lifetime, &iat,
			err, sizeof(err));
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
	d->status.token_expires = iat + b->lifetime;
	pthread_mutex_unlock(&b->lock);
	d->last_log[0] = '\0';
	mosquitto_log_callback_set(d->mosq, on_log);   /* until CONNACK: see on_connect */
	/* The connect closes any old socket (a zombie included) and opens a new one, which may
	 * get the same number: take the old one out of the epoll set first. */
	if(d->fd >= 0) epoll_ctl(b->epfd, EPOLL_CTL_DEL, d->fd, NULL);
	d->fd = -1;
	d->zombie_fd = -1;
	d->out_blocked = false;   /* the old connection's buffer goes with its SSL object */
	rc = mosquitto_connect_async(d->mosq, d->addr, b->port, b->keepalive);
	if(rc != MOSQ_ERR_SUCCESS){
		char why[300];
		/* On loopback or a fast link the handshake can fail inside the connect call: what
		 * OpenSSL said is then already in last_log. */
		snprintf(why, sizeof(why), "connect to %s (%s) port %d: %s%s%s", b->host, d->addr, b->port,
				rc == MOSQ_ERR_ERRNO ? strerror(errno) : mosquitto_strerror(rc),
				d->last_log[0] ? ": " : "", d->last_log);
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
	bridge_mark_dirty_locked(b, d);
	pthread_mutex_unlock(&b->lock);
	d->expired += n;
}

/* Lists d on b->flush, to have its write buffer written out by flush_outputs at due_us (0: at
 * the end of this loop turn), or earlier if something else makes it due. Never fails. */
static void schedule_flush(struct dev *d, int64_t due_us)
{
	struct akz_bridge *b = d->b;
	if(!d->in_flush || due_us < d->flush_due_us) d->flush_due_us = due_us;
	/* bridge_main's wait ends by the first due device (one due this turn: at once) */
	if(d->flush_due_us < b->next_flush_us) b->next_flush_us = d->flush_due_us;
	if(d->in_flush) return;
	d->in_flush = true;
	d->flush_next = b->flush;
	b->flush = d;
}

/* Lists d for this turn's flush if its write buffer holds records: a device's packets of one
 * loop turn leave in one write(2). */
static void note_output(struct dev *d)
{
	if(d->mosq && akz_tlsio_pending(mosquitto_ssl_get(d->mosq)) > 0) schedule_flush(d, 0);
}

/* Adds n uplinks handed to libmosquitto to the edge's uplink rate (b->load_rate), which is
 * taken anew once LOAD_WINDOW_US have passed. Relayed, not accepted, uplinks are counted: a
 * backlog drained after an outage is load too. A rate taken over a quiet spell is low: the
 * spell is in the span. Caller holds b->lock; never fails. */
static void count_load_locked(struct akz_bridge *b, size_t n, int64_t now)
{
	b->load_count += (int64_t)n;
	int64_t span = now - b->load_start_us;
	if(span >= LOAD_WINDOW_US){
		atomic_store_explicit(&b->load_rate, b->load_count * 1000000 / span, memory_order_relaxed);
		b->load_start_us = now;
		b->load_count = 0;
	}
}

/* Whether busy devices' uplinks are held now: holding saves the edge CPU (writes, TLS records,
 * TCP segments) when it is loaded, and costs latency always, up to the limit: at the default
 * limit one device sending 1,000 uplinks a second waited 10.6 ms at the median, on an edge
 * that had the time to send each at once. Any thread. */
static bool coalescing(const struct akz_bridge *b)
{
	return b->coalesce_us && (b->coalesce_rate == 0 ||
			atomic_load_explicit(&b->load_rate, memory_order_relaxed) >= b->coalesce_rate);
}

/* Whether the device's last write went out less than two coalescing limits ago while the edge
 * holds uplinks: a device that sends this often is busy, and its next uplinks may have company
 * worth waiting for. */
static bool wrote_lately(const struct dev *d, int64_t now)
{
	return coalescing(d->b) && now - d->last_flush_us < 2 * (int64_t)d->b->coalesce_us;
}

/* Whether a busy device's pending uplinks wait for more, up to coalesce_us, rather than go to
 * libmosquitto now; starts the wait if so. Why: akenza wants a connection per device, so at a
 * few hundred uplinks a second per device almost every uplink would be a TLS record, a write(2)
 * and a TCP segment of its own, each costing the edge (and akenza) more than the uplink itself.
 * They wait here, ahead of libmosquitto, so that they take no window slot: held in the TLS
 * buffer instead, they filled a busy device's window, and libmosquitto walks its whole list of
 * messages in flight on every PUBACK. Not held: a device that sends seldom (its last write
 * went two limits ago or more: nothing would join), uplinks enough to fill the window's free
 * slots (waiting would only leave it idle: an earlier variant that held a full window
 * throttled one device to 5,300 msg/s), COALESCE_MAX_BYTES of them, and uplinks of a device
 * whose read wrote something (d->urgent: a downlink's PUBACK), which ride along with it.
 * Caller holds b->lock. */
static bool hold_pending_locked(struct dev *d, int64_t now)
{
	struct akz_bridge *b = d->b;
	const struct akz_msgq *q = &d->pending;

	if(b->coalesce_us == 0 || d->urgent || q->count == 0) return false;
	if(d->hold_until_us == 0 && !wrote_lately(d, now)) return false;
	if(d->hold_until_us != 0 && now >= d->hold_until_us) return false;
	/* What could go now: as many as the window has room for */
	size_t room = (size_t)(WINDOW - d->inflight), n = q->count < room ? q->count : room;
	if(n == 0) return false;   /* a full window: the next PUBACK's read pumps */
	if((q->bytes / q->count + HOLD_OVERHEAD) * n >= COALESCE_MAX_BYTES) return false;
	/* A full window reopens a PUBACK or two at a time: refilling it each time would send an
	 * uplink or two per write again, so the refill waits for a quarter of the window. */
	if(q->count >= room && room >= REFILL_MIN) return false;
	if(d->hold_until_us == 0) d->hold_until_us = now + b->coalesce_us;
	return true;
}

/* Tells the broker thread whether it must wake this thread for the device's next uplinks
 * (pump_promised in akz_bridge_int.h). */
static void set_promise(struct dev *d, bool promised)
{
	pthread_mutex_lock(&d->b->lock);
	d->pump_promised = promised;
	pthread_mutex_unlock(&d->b->lock);
}

/* Decides, for a connected device, whether its pending uplinks wait (hold_pending_locked); if
 * they do, the flush at the hold's end takes them and the broker thread need not wake this
 * thread for more (the promise is made in the same locked step as the look at pending). */
static bool hold_uplinks(struct dev *d)
{
	struct akz_bridge *b = d->b;
	int64_t now = akz_mono_us();

	pthread_mutex_lock(&b->lock);
	bool hold = hold_pending_locked(d, now);
	if(hold) d->pump_promised = true;
	pthread_mutex_unlock(&b->lock);
	if(hold) schedule_flush(d, d->hold_until_us);
	return hold;
}

/* Hands a connected device's pending uplinks to libmosquitto while the window has room and the
 * socket takes them: QoS 1 ones wait in the window for their PUBACK, QoS 0 ones count as
 * relayed once handed over. Stopping while libmosquitto still has bytes to write keeps its
 * queue, and our memory, small. Returns how many went, counted (as relayed for QoS 0, as load,
 * and as direct when the broker thread hands them over: direct) in one locked step, since
 * the broker thread does this per uplink; *emptied says whether the last look found the
 * queue empty. Bridge thread, or broker thread holding io_lock; never fails (a failed
 * publish leaves the uplink at the head of the queue). */
static size_t hand_over_uplinks(struct dev *d, bool direct, bool *emptied)
{
	struct akz_bridge *b = d->b;
	size_t qos0 = 0, n = 0;

	*emptied = false;
	for(;;){
		bool full = d->inflight >= WINDOW || mosquitto_want_write(d->mosq);
		pthread_mutex_lock(&b->lock);
		struct akz_msg *m = akz_msgq_peek(&d->pending);
		/* The promise goes with this look, in one locked step: an uplink queued after an empty
		 * look wakes us; after a full window, the next PUBACK's read pumps. */
		bool done = m == NULL || full;
		if(done) d->pump_promised = m != NULL;
		pthread_mutex_unlock(&b->lock);
		*emptied = m == NULL;
		if(done) break;
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
			set_promise(d, false);   /* the next uplink tries again, as the next event does */
			ERR_clear_error();       /* OpenSSL's queue is per thread: leave none behind */
			break;
		}
		m = pop_pending(d);
		n++;
		if(qos == 1){
			put_inflight(d, mid, m);
		}else{
			settle(d, m);
			free(m);
			qos0++;
		}
	}
	if(n == 0) return 0;
	int64_t now = akz_mono_us();
	pthread_mutex_lock(&b->lock);
	if(qos0) count_relayed_locked(d, qos0);
	count_load_locked(b, n, now);
	if(direct) b->sum.uplinks_direct += n;
	pthread_mutex_unlock(&b->lock);
	return n;
}

/* Hands pending uplinks to libmosquitto (hand_over_uplinks), unless they are held, and lists
 * the device for this turn's write. release: the hold is over (flush_outputs); otherwise a
 * busy device's uplinks may wait. Bridge thread, with io_lock held. */
static void pump_uplinks(struct dev *d, bool release)
{
	struct akz_bridge *b = d->b;
	bool up = d->state == ST_CONNECTED && !d->refreshing, emptied;

	if(up && !release && b->coalesce_us && hold_uplinks(d)) return;
	d->hold_until_us = 0;
	if(up) (void)hand_over_uplinks(d, false, &emptied);
	else set_promise(d, true);   /* the CONNACK's read pumps */
	d->urgent = false;
	note_output(d);
	update_interest(d);
}

/* Writes out one device's write buffer. Returns 1 when all went, 0 when the socket took only
 * part (it then has EPOLLOUT interest until it has taken all), -1 on a write error (errno set;
 * the connection is left as it is). Bridge thread, or broker thread holding io_lock. */
static int write_output(struct dev *d)
{
	if(d->mosq == NULL || d->fd < 0) return 1;
	if(d->b->coalesce_us) d->last_flush_us = akz_mono_us();
	int rc = akz_tlsio_flush(mosquitto_ssl_get(d->mosq));
	if(rc < 0) return -1;
	bool blocked = rc == 0;
	if(blocked != d->out_blocked){
		d->out_blocked = blocked;
		update_interest(d);
	}
	return rc;
}

/* Writes out one device's write buffer (write_output). Returns false if the connection failed
 * and was dropped. Bridge thread. */
static bool flush_output(struct dev *d)
{
	if(write_output(d) >= 0) return true;
	char why[160];
	snprintf(why, sizeof(why), "write: %s", strerror(errno));
	drop_connection(d, why, MOSQ_ERR_ERRNO);
	return false;
}

/* Whether the broker thread may write the device's new uplink itself (bridge_send_direct):
 * connected and idle, with nothing this thread has planned for it. Caller holds io_lock. */
static bool idle_for_direct(const struct dev *d)
{
	return d->mosq && d->state == ST_CONNECTED && !d->refreshing && d->fd >= 0
		&& !d->in_flush && !d->out_blocked && d->hold_until_us == 0 && d->inflight < WINDOW
		&& !mosquitto_want_write(d->mosq) && !wrote_lately(d, akz_mono_us());
}

/* Contract in akz_bridge_int.h. */
bool bridge_send_direct(struct dev *d)
{
	bool sent = false, emptied = false;

	if(pthread_mutex_trylock(&d->io_lock)) return false;   /* the bridge thread is on it */
	if(idle_for_direct(d)){
		(void)hand_over_uplinks(d, true, &emptied);
		/* A socket libmosquitto closed meanwhile is for the bridge thread to find (check_socket). */
		sent = emptied && write_output(d) >= 0 && mosquitto_socket(d->mosq) == d->fd;
	}
	pthread_mutex_unlock(&d->io_lock);
	return sent;
}

/* Writes out the listed devices that are due: those whose buffer this turn filled, and those
 * whose held uplinks' wait is over, which are handed to libmosquitto first. The others stay
 * on b->flush, and b->next_flush_us says when the first of them is due. */
static void flush_outputs(struct akz_bridge *b)
{
	struct dev *held = NULL;
	int64_t now = b->flush && b->coalesce_us ? akz_mono_us() : INT64_MAX, next = INT64_MAX;

	while(b->flush){
		struct dev *d = b->flush;
		b->flush = d->flush_next;
		if(d->flush_due_us > now){
			d->flush_next = held;
			held = d;
			if(d->flush_due_us < next) next = d->flush_due_us;
			continue;
		}
		/* Held uplinks, and those queued meanwhile without a wake (pump_promised), go now,
		 * also when something else (a ping) made the flush due. d is on no list but still
		 * in_flush, so note_output leaves it there. */
		d->flush_due_us = 0;
		pthread_mutex_lock(&d->io_lock);
		if(d->mosq) pump_uplinks(d, true);
		d->in_flush = false;
		flush_output(d);
		pthread_mutex_unlock(&d->io_lock);
	}
	b->flush = held;
	b->next_flush_us = next;
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
		check_socket(d, disconnect_upstream(d));
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
		bridge_log(b, MOSQ_LOG_NOTICE, "akenza: device '%s': key changed (kid %s): reconnecting",
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
		check_socket(d, disconnect_upstream(d));
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

/* Contract in akz_bridge_int.h. */
void bridge_destroy_dev(struct dev *d)
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
	akz_mint_cancel(&d->mint);
	akz_key_unref(d->key);
	akz_key_unref(d->next_key);
	give_back(d);
	pthread_mutex_destroy(&d->io_lock);
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
			bridge_log(b, MOSQ_LOG_WARNING, "akenza: device '%s': wall clock stepped by %" PRId64
					" s since its token was minted: refreshing the token now", d->id, jump);
			d->due_ms = now;
		}
		if(now >= d->due_ms){
			d->refreshing = true;
			d->drain_deadline_ms = now + REFRESH_DRAIN_MS;
		}
	}
	/* A key in a TPM signs the next token while the uplinks in flight drain: the connection
	 * goes when both are done, or at the drain's deadline. A failure is not reported here: it
	 * shows again at the reconnect, which backs off then. */
	char ignored[8];
	if(d->refreshing && ((d->inflight == 0 && poll_token(d, ignored, sizeof(ignored)) != AKZ_MINT_PENDING)
				|| now >= d->drain_deadline_ms)){
		d->reconnect_now = true;
		check_socket(d, disconnect_upstream(d));
		if(d->state == ST_CONNECTED) drop_connection(d, "token refresh", MOSQ_ERR_SUCCESS);
		return;
	}
	/* Alive means acknowledged: a socket that takes uplinks and answers nothing is dead. */
	if(d->inflight > 0 && now - d->waiting_ack_since_ms > (int64_t)b->keepalive * 1000){
		bridge_log(b, MOSQ_LOG_WARNING, "akenza: device '%s': no PUBACK for %d s: reconnecting",
				d->id, b->keepalive);
		drop_connection(d, "no PUBACK from akenza", MOSQ_ERR_KEEPALIVE);
	}
}

static void sweep_device(struct dev *d, int64_t now, int64_t wall_off)
{
	if(d->state != ST_CONNECTED) expire_pending(d, (int64_t)time(NULL));
	if(d->expired){
		bridge_log(d->b, MOSQ_LOG_WARNING, "akenza: device '%s': %" PRIu64 " uplinks older than "
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
		if(now < d->due_ms || pilot_holds(d->b, now) || token_pending(d)) break;
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

/* Whether this sweep looks at the device. A connected device's timers (keepalive, token refresh,
 * PUBACK liveness) are seconds long, so it is looked at every SWEEP_SPREAD sweeps, a tenth of
 * the devices each time: at every sweep, 1,000 devices cost 0.7% of a core at rest and each
 * sweep held a core for ~2 us a device, a stall that uplinks in flight met. A device connecting,
 * refreshing its token or waiting to retry is looked at every sweep. */
static bool sweep_due(const struct dev *d, bool stepped)
{
	return d->state != ST_CONNECTED || d->refreshing || stepped
		|| d->b->sweep_turn % SWEEP_SPREAD == d->sweep_phase;
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
	bridge_log(b, MOSQ_LOG_NOTICE, "akenza: the wall clock stepped by %" PRId64 " s: devices waiting to "
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
	bridge_log(b, MOSQ_LOG_NOTICE, "akenza: %zu of %zu devices not connected (%zu in backoff, %zu "
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
		in->sweep_phase = (unsigned)(b->adopted++ % SWEEP_SPREAD);
		b->devs = in;
		in = next;
	}
	b->sweep_turn++;
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
				bridge_log(b, MOSQ_LOG_NOTICE, "akenza: device '%s' left the bridge", d->id);
				bridge_destroy_dev(d);
				continue;
			}
			if(changed){
				pthread_mutex_lock(&d->io_lock);
				apply_change(d);
				pthread_mutex_unlock(&d->io_lock);
			}
		}
		if(sweep_due(d, stepped)){
			pthread_mutex_lock(&d->io_lock);
			sweep_device(d, now, wall_off);
			pthread_mutex_unlock(&d->io_lock);
		}
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
		pthread_mutex_lock(&d->io_lock);
		if(d->mosq) pump_uplinks(d, false);
		pthread_mutex_unlock(&d->io_lock);
		pthread_mutex_lock(&b->lock);
	}
	bool more = b->ready != NULL;   /* more next turn: do not starve the sockets */
	if(more) b->wake_pending = true;
	pthread_mutex_unlock(&b->lock);
	if(more) bridge_wake(b);
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
		size_t before = akz_tlsio_pending(mosquitto_ssl_get(d->mosq));
		read_socket(d);
		/* What reading wrote (a downlink's PUBACK, a TLS alert) goes this turn, and takes held
		 * uplinks along: see hold_pending_locked */
		if(d->mosq && akz_tlsio_pending(mosquitto_ssl_get(d->mosq)) > before) d->urgent = true;
		/* During the TLS handshake libmosquitto takes a closed connection for "try again":
		 * with a level-triggered epoll that would spin, so the end is taken as final here. */
		if(d->fd >= 0 && d->state == ST_CONNECTING && (events & (EPOLLERR | EPOLLHUP | EPOLLRDHUP))){
			drop_connection(d, "connection closed during the handshake", MOSQ_ERR_CONN_LOST);
		}
	}
	if((events & EPOLLOUT) && d->fd >= 0 && (!d->out_blocked || flush_output(d))){
		check_socket(d, mosquitto_loop_write(d->mosq, WINDOW));
	}
	/* PUBACKs free window slots: refill them, now or when enough are free (hold_pending_locked). */
	pump_uplinks(d, false);
}

/* Reads the devices that were left with input in OpenSSL last turn. */
static void reread_devices(struct akz_bridge *b)
{
	struct dev *d = b->reread;
	b->reread = NULL;
	while(d){
		struct dev *next = d->reread_next;
		d->in_reread = false;
		pthread_mutex_lock(&d->io_lock);
		handle_io(d, EPOLLIN);
		pthread_mutex_unlock(&d->io_lock);
		d = next;
	}
}

/* Contract in akz_bridge_int.h. */
void *bridge_main(void *arg)
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
		if(b->flush){   /* listed devices: wake when the first is due (ms, rounded up) */
			int64_t wait_ms = (b->next_flush_us - akz_mono_us() + 999) / 1000;
			if(wait_ms < timeout) timeout = (int)(wait_ms < 0 ? 0 : wait_ms);
		}
		int repoke = akz_wakeup_recheck(b->wakeup);
		if(repoke >= 0 && repoke < timeout) timeout = repoke;
		if(timeout < 0 || b->reread) timeout = 0;
		int n = epoll_wait(b->epfd, evs, (int)(sizeof(evs)/sizeof(evs[0])), timeout);
		if(n < 0 && errno != EINTR){
			bridge_log(b, MOSQ_LOG_ERR, "akenza: bridge: epoll_wait: %s", strerror(errno));
			usleep(100000);
			continue;
		}
		for(int i = 0; i < n; i++){
			if(evs[i].data.ptr == NULL){
				uint64_t v;
				if(read(b->wakefd, &v, sizeof(v)) < 0 && errno != EAGAIN){
					bridge_log(b, MOSQ_LOG_ERR, "akenza: bridge: eventfd: %s", strerror(errno));
				}
				continue;
			}
			struct dev *d = evs[i].data.ptr;
			pthread_mutex_lock(&d->io_lock);
			if(d->mosq && (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP))){
				akz_tlsio_readable(mosquitto_ssl_get(d->mosq));
			}
			handle_io(d, evs[i].events);
			pthread_mutex_unlock(&d->io_lock);
		}
		reread_devices(b);
		pump_ready(b);
		flush_outputs(b);
	}
	return NULL;
}

/* Contract in akz_bridge_int.h. */
void bridge_wake(struct akz_bridge *b)
{
	uint64_t one = 1;
	if(write(b->wakefd, &one, sizeof(one)) < 0 && errno != EAGAIN){
		/* The bridge still runs its sweep every 100 ms: nothing waits for long. */
	}
}
