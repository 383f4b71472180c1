/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* bridge_loop.c - the bridge thread: every device's akenza connection on one event loop
 * (evloop.c). It alone drives the libmosquitto clients; for each device it feeds the connection
 * state machine (conn.c), carries out what it asks, and keeps the window of uplinks in flight
 * (window.c). The threads and their rules: docs/DESIGN.md. */
#include <errno.h>
#include <inttypes.h>
#include <malloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include "akz_mosquitto.h"
#include "akz_bridge_int.h"
#include "akz_fds.h"
#include "akz_jwt.h"
#include "akz_keythread.h"
#include "akz_tls.h"
#include "akz_tlsio.h"
#include "akz_topic.h"

#define CLOCK_JUMP_S 30           /* a wall-clock step larger than this re-mints the tokens */
#define CLOCK_CHECK_MS 1000       /* how often the wall clock is looked at for steps */
#define OUTAGE_REPORT_MS 60000    /* devices not connected are summed up in the log this often */
#define TRIM_AFTER_MS 5000        /* quiet time after connects before memory is given back */
#define READ_ROUNDS 64            /* loop_read calls per device and turn while OpenSSL holds input */
#define SLOT_RECHECK_MS 10        /* connects waiting for the first name lookup or the pilot */
#define PILOT_MS 2000             /* longest wait for the first TLS session before the others */
#define TOKEN_POLL_MS 100         /* how often a token signed on the key thread is looked for */
#define REFILL_MIN (AKZ_WINDOW / 4)   /* a full window is refilled this many slots at a time */

#define blog(b, ...) akz_handoff_log((b)->out, __VA_ARGS__)

static void update_interest(struct dev *d);
static void dev_arm(struct dev *d);

/* A uniformly random 32-bit number (for the state machine's jitter). */
static uint32_t random_u32(void)
{
	uint32_t r;
	if(RAND_bytes((unsigned char *)&r, sizeof(r)) != 1) r = (uint32_t)rand();
	return r;
}

/* Wall clock minus monotonic clock, in seconds: it moves only when the wall clock is stepped. */
static int64_t wall_offset_s(void)
{
	return (int64_t)time(NULL) - akz_mono_ms() / 1000;
}

static int64_t keepalive_ms(const struct akz_bridge *b)
{
	return (int64_t)b->keepalive * 1000;
}

/* ---- counting and status ------------------------------------------------------------------ */

/* Counts n of the device's uplinks as relayed (acknowledged by akenza, or written at QoS 0) and
 * expired as dropped by the TTL, in one locked step. Never fails. */
static void count_done(struct dev *d, size_t relayed, size_t expired)
{
	struct akz_bridge *b = d->b;
	if(relayed + expired == 0) return;
	pthread_mutex_lock(&b->lock);
	d->unacked -= relayed + expired;
	if(!d->removed) b->sum.queued -= relayed + expired;   /* a removed one was counted out */
	b->sum.uplinks += relayed;
	b->sum.expired += expired;
	b->sum_dirty = true;
	pthread_mutex_unlock(&b->lock);
}

/* Hands a copy of the device's status to the broker thread, which publishes it. */
static void send_status(struct dev *d, int64_t now)
{
	struct akz_bridge *b = d->b;
	struct akz_status_dev st;

	pthread_mutex_lock(&b->lock);
	bridge_status_copy_locked(d, &st);
	bool removed = d->removed;
	pthread_mutex_unlock(&b->lock);
	d->status_sent_ms = now;
	d->status_due = false;
	if(!removed) (void)akz_handoff_status(b->out, d->id, &st, d->sd);
}

/* The device's status changed: it goes to the broker thread now, or, when the last one went
 * less than status_interval_ms ago, then (a flapping device is not published at every flap). */
static void status_changed(struct dev *d)
{
	struct akz_bridge *b = d->b;
	int64_t now = akz_mono_ms();
	if(now - d->status_sent_ms >= b->status_interval_ms){
		send_status(d, now);
	}else{
		d->status_due = true;
		akz_ev_timer_arm_by(b->loop, &d->timer, d->status_sent_ms + b->status_interval_ms);
	}
}

/* Wakes the broker thread for what was handed over (plugin_opt_downlink_wakeup signal), and
 * makes sure the wake-up is sent again if the TICK does not take it (akz_wakeup_recheck). */
static void poke_broker(struct akz_bridge *b)
{
	if(b->wakeup == NULL) return;
	akz_wakeup_poke(b->wakeup);
	akz_ev_timer_arm_by(b->loop, &b->repoke_timer, akz_mono_ms() + 1);
}

/* Hands m (may be NULL: out of memory) to the broker thread to publish. Returns false, with m
 * freed and counted as an error, when m is NULL or the queue is full. */
static bool publish_later(struct akz_bridge *b, struct akz_msg *m)
{
	if(akz_handoff_message(b->out, m)){
		poke_broker(b);
		return true;
	}
	pthread_mutex_lock(&b->lock);
	b->sum.errors++;
	b->sum_dirty = true;
	pthread_mutex_unlock(&b->lock);
	return false;
}

/* Queues the delivery receipt of m: on <prefix><id>, the uplink's correlation data as property
 * when it had some, and {"seq","topic","time"} as payload. */
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
	if(!publish_later(b, r)){
		blog(b, MOSQ_LOG_ERR, "akenza: device '%s': receipt for uplink %" PRIu64 " dropped: the "
				"broker is not taking messages fast enough", d->id, m->seq);
	}
}

/* ---- state changes -------------------------------------------------------------------------- */

/* Between connect and CONNACK: counted in b->handshakes. */
static bool handshaking(const struct akz_conn *c)
{
	return c->state == AKZ_CONN_CONNECTING && c->linked;
}

/* Records a transition in the device's status, the summary and the log. In an outage every
 * device retries every minute or two, so only news (akz_conn_out) is logged at the normal level;
 * the outage report sums up the rest once a minute. */
static void record_state(struct dev *d, enum akz_conn_state was, const char *error,
		const struct akz_conn_out *out)
{
	struct akz_bridge *b = d->b;
	enum akz_conn_state st = d->conn.state;

	b->nstate[was]--;
	b->nstate[st]++;
	pthread_mutex_lock(&b->lock);
	d->acks_will_pump = false;   /* no PUBACK may come now: new uplinks wake the thread */
	if(out->changed){
		if(!d->removed && st == AKZ_CONN_CONNECTED) b->sum.connected++;
		if(!d->removed && was == AKZ_CONN_CONNECTED) b->sum.connected--;
		b->sum_dirty = true;
		d->status.state = akz_conn_state_names[st];
		d->status.since = time(NULL);
	}
	if(error) snprintf(d->status.last_error, sizeof(d->status.last_error), "%s", error);
	pthread_mutex_unlock(&b->lock);
	status_changed(d);
	if(out->changed){
		int level = st == AKZ_CONN_CONNECTED ? MOSQ_LOG_NOTICE : out->news ? MOSQ_LOG_INFO : MOSQ_LOG_DEBUG;
		blog(b, level, "akenza: device '%s': %s%s%s", d->id, akz_conn_state_names[st],
				error ? ": " : "", error ? error : "");
	}
}

static void queue_for_slot(struct dev *d);
static void hang_up(struct dev *d);
static void abort_connection(struct dev *d, const char *why);

/* Feeds ev (with the CONNACK's rc, error: the reason of a failure (may be NULL), and waits:
 * what a due token refresh waits for besides the uplinks in flight) to the device's state
 * machine and carries out what it asks. Returns what it said. Never fails. */
static struct akz_conn_out conn_step(struct dev *d, enum akz_conn_event ev, int rc, const char *error,
		int waits)
{
	struct akz_bridge *b = d->b;
	struct akz_conn_in in = {.now_ms = akz_mono_ms(), .rnd = random_u32(), .connack_rc = rc,
			.inflight = d->win.count + waits};
	enum akz_conn_state was = d->conn.state;
	bool shook = handshaking(&d->conn);
	struct akz_conn_out out;

	akz_conn_step(&d->conn, ev, &in, &out);
	if(shook != handshaking(&d->conn)){
		b->handshakes += shook ? -1 : 1;
		if(shook) b->slots_changed = true;   /* a handshake slot is free */
	}
	if(out.address_failed && d->addr[0]) akz_resolver_failed(b->resolver, d->addr);
	const char *why = out.reason ? out.reason : error;
	if(out.failed){
		b->failed_since_report++;
		snprintf(b->last_failure, sizeof(b->last_failure), "device '%s': %s", d->id, why ? why : "failed");
	}
	if(out.changed || (out.failed && why)) record_state(d, was, why, &out);
	switch(out.action){
	case AKZ_CONN_NONE: break;
	case AKZ_CONN_WANT_SLOT: queue_for_slot(d); break;
	case AKZ_CONN_HANG_UP: hang_up(d); break;
	case AKZ_CONN_ABORT: abort_connection(d, why ? why : "closed"); break;
	}
	dev_arm(d);
	return out;
}

/* conn_step with nothing to wait for but the uplinks in flight. */
static struct akz_conn_out conn_event(struct dev *d, enum akz_conn_event ev, int rc, const char *error)
{
	return conn_step(d, ev, rc, error, 0);
}

/* The device's next token (akz_mint_poll): signed on the key thread for a key in a TPM, which
 * may be slow or stop answering (neither may stall this thread); DONE at once for a key in
 * memory, which start_connect signs itself. */
static enum akz_mint_rc poll_token(struct dev *d, char *err, size_t errlen)
{
	return akz_mint_poll(&d->mint, d->key, d->b->audience, d->id, d->b->lifetime,
			akz_keythread_timeout_ms(), err, errlen);
}

/* Whether a token refresh under way may hang up: every uplink in flight acknowledged and the
 * next token ready. A failure to sign is not reported here: it shows again at the reconnect,
 * which backs off then. */
static bool refresh_ready(struct dev *d)
{
	char ignored[8];
	return d->win.count == 0 && poll_token(d, ignored, sizeof(ignored)) != AKZ_MINT_PENDING;
}

/* The reason a connection ended, with what libmosquitto logged before (a TLS failure). */
static const char *lost_reason(struct dev *d, int rc, char *buf, size_t len)
{
	snprintf(buf, len, "%s%s%s", mosquitto_strerror(rc), d->last_log[0] ? ": " : "", d->last_log);
	return buf;
}

/* ---- the connection's socket ---------------------------------------------------------------- */

/* Keeps the loop's interest in step with libmosquitto's socket, which changes on reconnects.
 * d->io.fd is a socket that is open and watched, or -1: one libmosquitto closed has left the
 * epoll set by itself (check_socket). */
static void update_interest(struct dev *d)
{
	struct akz_bridge *b = d->b;
	bool wants = d->conn.state == AKZ_CONN_CONNECTED || handshaking(&d->conn);
	int fd = d->mosq && wants ? mosquitto_socket(d->mosq) : -1;
	uint32_t ev = EPOLLIN | EPOLLRDHUP;

	if(fd == d->zombie_fd) fd = -1;
	if(fd >= 0 && (mosquitto_want_write(d->mosq) || d->out_blocked)) ev |= EPOLLOUT;
	if(akz_ev_io_watch(b->loop, &d->io, fd, fd >= 0 ? ev : 0)){
		blog(b, MOSQ_LOG_ERR, "akenza: device '%s': epoll_ctl: %s", d->id, strerror(errno));
	}
}

/* Runs after every libmosquitto call that may close the socket. Some of its paths (a failed
 * TLS handshake) close it without calling on_disconnect: the device would then wait forever
 * for a connection that is gone, so the loss is reported here. */
static void check_socket(struct dev *d, int rc)
{
	if(d->io.fd >= 0 && mosquitto_socket(d->mosq) != d->io.fd){
		akz_ev_io_forget(&d->io);   /* closed, so already out of the epoll set */
		if(!d->disconnect_seen){
			char why[300];
			conn_event(d, AKZ_CONN_LOST, 0, lost_reason(d, rc ? rc : MOSQ_ERR_CONN_LOST, why, sizeof(why)));
		}
	}
	d->disconnect_seen = false;
	update_interest(d);
}

/* Gives up on the connection at once, for a peer that is unresponsive or a handshake that
 * died, where libmosquitto may never report anything. The socket is shut down (the peer sees
 * the end now) and left to libmosquitto, which closes it at the next connect. The state machine
 * has moved on already. */
static void abort_connection(struct dev *d, const char *why)
{
	int fd = d->mosq ? mosquitto_socket(d->mosq) : -1;
	akz_ev_io_watch(d->b->loop, &d->io, -1, 0);
	if(fd >= 0 && fd != d->zombie_fd){
		shutdown(fd, SHUT_RDWR);
		d->zombie_fd = fd;
	}
	snprintf(d->last_log, sizeof(d->last_log), "%s", why);
}

/* The connection failed in a way libmosquitto does not see (a dead peer, a write error): drop
 * it and tell the state machine. */
static void fail_connection(struct dev *d, const char *why, int rc)
{
	char reason[300];
	abort_connection(d, why);
	conn_event(d, AKZ_CONN_LOST, 0, lost_reason(d, rc, reason, sizeof(reason)));
}

/* Ends the connection with a DISCONNECT (a token refresh, a restart): libmosquitto writes it,
 * closes the socket and calls on_disconnect, which the state machine, having moved on, ignores.
 * The write buffer is written out and switched off first: libmosquitto 2.1 shuts the socket
 * down right after writing the DISCONNECT (2.0 closed it through SSL_shutdown, whose flush
 * wrote the buffer out). Never from inside a libmosquitto callback, where the DISCONNECT would
 * only be queued. */
static void hang_up(struct dev *d)
{
	if(d->mosq == NULL) return;
	(void)akz_tlsio_unbuffer(mosquitto_ssl_get(d->mosq));   /* a failure shows in the write */
	check_socket(d, mosquitto_disconnect(d->mosq));
	if(mosquitto_socket(d->mosq) >= 0) abort_connection(d, "disconnected");
}

/* ---- writing ---------------------------------------------------------------------------------- */

/* Lists d for this turn's write if its write buffer holds records: a device's packets of one
 * loop turn leave in one write(2) (tlsio.c). */
static void note_output(struct dev *d)
{
	if(d->in_flush || d->mosq == NULL || akz_tlsio_pending(mosquitto_ssl_get(d->mosq)) == 0) return;
	d->in_flush = true;
	d->flush_next = d->b->flush;
	d->b->flush = d;
}

/* Writes out the device's write buffer. Returns false if the connection failed and was
 * dropped. When the socket takes only part, EPOLLOUT is watched until it has taken all. */
static bool flush_output(struct dev *d)
{
	if(d->mosq == NULL || d->io.fd < 0) return true;
	SSL *ssl = mosquitto_ssl_get(d->mosq);
	if(akz_tlsio_pending(ssl)) d->out_ms = akz_mono_ms();
	int rc = akz_tlsio_flush(ssl);
	if(rc < 0){
		char why[160];
		snprintf(why, sizeof(why), "write: %s", strerror(errno));
		fail_connection(d, why, MOSQ_ERR_ERRNO);
		return false;
	}
	bool blocked = rc == 0;
	if(blocked != d->out_blocked){
		d->out_blocked = blocked;
		update_interest(d);
	}
	return true;
}

/* Writes out every device that wrote this loop turn. Returns whether the turn was light (docs/
 * DESIGN.md, "The light-load pause"): it sent uplinks, at most a window's worth, and every device
 * that wrote is connected, took all it was given and has less than a quarter of its window in
 * flight. */
static bool flush_outputs(struct akz_bridge *b)
{
	bool light = b->turn_sent > 0 && b->turn_sent <= AKZ_WINDOW;
	b->turn_sent = 0;
	while(b->flush){
		struct dev *d = b->flush;
		b->flush = d->flush_next;
		d->in_flush = false;
		bool ok = flush_output(d);
		light = light && ok && !d->out_blocked && d->conn.state == AKZ_CONN_CONNECTED &&
				d->win.count < REFILL_MIN;
	}
	return light;
}

/* ---- uplinks ----------------------------------------------------------------------------------- */

/* Logs what the TTL dropped since the last line. */
static void report_expired(struct dev *d)
{
	if(d->expired == 0) return;
	blog(d->b, MOSQ_LOG_WARNING, "akenza: device '%s': %" PRIu64 " uplinks older than "
			"plugin_opt_spool_ttl (%" PRId64 " s) dropped undelivered", d->id, d->expired, d->b->ttl);
	d->expired = 0;
}

/* Drops pending uplinks older than the TTL, oldest first (they are in arrival order). For a
 * device not connected; a connected one drops them as it hands them over. */
static void expire_pending(struct dev *d)
{
	struct akz_bridge *b = d->b;
	struct akz_msgq old = {0};
	int64_t wall = (int64_t)time(NULL);

	if(b->ttl == 0) return;
	pthread_mutex_lock(&b->lock);
	while(d->pending.head && wall - d->pending.head->time > b->ttl) akz_msgq_take_head(&old, &d->pending, 1);
	pthread_mutex_unlock(&b->lock);
	if(old.count == 0) return;
	size_t n = old.count;
	for(struct akz_msg *m; (m = akz_msgq_pop(&old)) != NULL; free(m)){
		akz_window_taken(&d->win, m);
		akz_window_settle(&d->win, b->spool, d->sd, m);
	}
	count_done(d, 0, n);
	d->expired += n;
	report_expired(d);
	status_changed(d);
}

/* Puts m and the rest of its batch back at the head of pending, in order (a failed publish). */
static void put_back(struct dev *d, struct akz_msg *m, struct akz_msgq *rest)
{
	struct akz_msgq q = {0};
	akz_msgq_push(&q, m);
	akz_msgq_take_all(&q, rest);
	pthread_mutex_lock(&d->b->lock);
	akz_msgq_take_all(&q, &d->pending);
	d->pending = q;
	pthread_mutex_unlock(&d->b->lock);
}

/* Hands one uplink to libmosquitto: QoS 1 waits in the window for its PUBACK, QoS 0 is done.
 * Returns false when libmosquitto refused it (m is untouched then). */
static bool hand_over(struct dev *d, struct akz_msg *m, size_t *written)
{
	int mid = 0;
	int qos = m->qos > 1 ? 1 : m->qos;   /* akenza takes QoS 0 and 1; 2 goes as 1 */
	int rc = mosquitto_publish(d->mosq, &mid, m->topic, (int)m->payloadlen, m->payload, qos, false);
	if(rc != MOSQ_ERR_SUCCESS){
		snprintf(d->last_log, sizeof(d->last_log), "publish: %s", mosquitto_strerror(rc));
		ERR_clear_error();   /* OpenSSL's error queue is per thread: leave none behind */
		return false;
	}
	akz_window_taken(&d->win, m);
	d->b->turn_sent++;
	if(qos == 1){
		if(d->win.count == 0) d->acked_ms = akz_mono_ms();   /* the PUBACK wait starts */
		akz_window_put(&d->win, mid, m);
	}else{
		akz_window_settle(&d->win, d->b->spool, d->sd, m);
		free(m);
		(*written)++;
	}
	return true;
}

/* Hands a connected device's pending uplinks to libmosquitto while its window has room and the
 * socket takes them. The batching rule: a loop turn's uplinks of a device leave in one write, up
 * to the free window, and a full window is refilled a quarter at a time (REFILL_MIN): PUBACKs
 * free a slot or two at a time, and refilling each at once would send an uplink per write, each
 * a write(2), a TLS record and a TCP segment. Uplinks past the TTL are dropped instead. Never
 * fails: a refused publish leaves the uplink at the head of the queue for the next connection. */
static void pump_uplinks(struct dev *d)
{
	struct akz_bridge *b = d->b;
	size_t written = 0, expired = 0;

	if(d->conn.state != AKZ_CONN_CONNECTED || d->conn.refreshing || d->mosq == NULL || d->io.fd < 0) return;
	int64_t wall = b->ttl ? (int64_t)time(NULL) : 0;
	while(d->win.count < AKZ_WINDOW && !mosquitto_want_write(d->mosq)){
		struct akz_msgq batch = {0};
		size_t room = (size_t)(AKZ_WINDOW - d->win.count);
		pthread_mutex_lock(&b->lock);
		/* The window would be full again: wait for a quarter of it. The next PUBACK's read
		 * looks again, so the broker thread need not wake this thread for more (acks_will_pump). */
		bool wait = room < REFILL_MIN && d->pending.count >= room;
		d->acks_will_pump = wait;
		if(!wait) akz_msgq_take_head(&batch, &d->pending, room);
		pthread_mutex_unlock(&b->lock);
		if(wait) break;
		bool last = batch.count < room;   /* pending is empty now */
		for(struct akz_msg *m; (m = akz_msgq_pop(&batch)) != NULL;){
			if(b->ttl && wall - m->time > b->ttl){
				akz_window_taken(&d->win, m);
				akz_window_settle(&d->win, b->spool, d->sd, m);
				free(m);
				expired++;
			}else if(!hand_over(d, m, &written)){
				put_back(d, m, &batch);
				goto done;
			}
		}
		if(last) break;
	}
done:
	count_done(d, written, expired);
	if(expired){
		d->expired += expired;
		report_expired(d);
		status_changed(d);
	}
	note_output(d);
}

/* ---- libmosquitto's callbacks (inside loop_read and friends) ------------------------------------ */

/* PUBACK of a QoS 1 uplink (QoS 0 ones also land here, untracked, once written). The counts
 * are taken after the read, in one locked step (after_read). */
static void on_publish(struct mosquitto *mosq, void *obj, int mid)
{
	struct dev *d = obj;
	(void)mosq;

	struct akz_msg *m = akz_window_take(&d->win, mid);
	if(m == NULL) return;
	d->acked_ms = akz_mono_ms();
	akz_window_settle(&d->win, d->b->spool, d->sd, m);
	if(d->b->receipts) queue_receipt(d, m);
	free(m);
	d->acked++;
}

static void on_connect(struct mosquitto *mosq, void *obj, int rc)
{
	struct dev *d = obj;
	struct akz_bridge *b = d->b;

	if(rc == 4 || rc == 5){
		char msg[160];
		snprintf(msg, sizeof(msg), "akenza refused the credentials (%s)", mosquitto_connack_string(rc));
		struct akz_conn_out out = conn_event(d, AKZ_CONN_CONNACK, rc, msg);
		blog(b, out.news ? MOSQ_LOG_WARNING : MOSQ_LOG_DEBUG, "akenza: device '%s': %s: the public "
				"key with kid %s is probably not registered in akenza for this device (or this "
				"box's clock is off, which makes its tokens look expired or future-dated); "
				"retrying in minutes", d->id, msg, akz_key_kid(d->key));
		return;
	}
	if(rc != 0){
		conn_event(d, AKZ_CONN_CONNACK, rc, mosquitto_connack_string(rc));
		return;
	}
	SSL *ssl = mosquitto_ssl_get(mosq);
	/* Without the buffer (out of memory) every packet is its own write(2): slower, not wrong. */
	(void)akz_tlsio_attach(ssl);
	bool resumed = ssl && SSL_session_reused(ssl);
	pthread_mutex_lock(&b->lock);
	b->sum.connects++;
	if(resumed) b->sum.tls_resumed++;
	pthread_mutex_unlock(&b->lock);
	d->acked_ms = d->out_ms = akz_mono_ms();
	char topic[512];
	snprintf(topic, sizeof(topic), AKZ_DOWN_PREFIX "%s/#", d->id);
	int src = mosquitto_subscribe(mosq, NULL, topic, 1);
	if(src != MOSQ_ERR_SUCCESS){
		blog(b, MOSQ_LOG_ERR, "akenza: device '%s': cannot subscribe to downlinks: %s", d->id,
				mosquitto_strerror(src));
	}
	d->last_log[0] = '\0';
	/* libmosquitto formats a log line into a fresh malloc for every packet it sends or gets,
	 * whatever its level, as long as a log callback is set: two per relayed uplink. What we
	 * keep from it (the reason a TLS handshake or connect failed) comes before CONNACK, so the
	 * callback goes now and comes back with the next connect. */
	mosquitto_log_callback_set(mosq, NULL);
	conn_event(d, AKZ_CONN_CONNACK, 0, NULL);
}

static void on_disconnect(struct mosquitto *mosq, void *obj, int rc)
{
	struct dev *d = obj;
	char why[300];
	(void)mosq;

	d->disconnect_seen = true;
	akz_ev_io_forget(&d->io);   /* libmosquitto closed it: it left the epoll set */
	conn_event(d, AKZ_CONN_LOST, 0, lost_reason(d, rc, why, sizeof(why)));
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
	if(!publish_later(b, m)){
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

/* ---- connecting ---------------------------------------------------------------------------------- */

/* Creates the device's libmosquitto client. Returns 0, or -1 when out of memory. */
static int create_client(struct dev *d)
{
	struct akz_bridge *b = d->b;

	/* clean_session false: akenza keeps QoS 1 downlinks for the device while the link is down. */
	d->mosq = mosquitto_new(d->id, false, d);
	if(d->mosq == NULL) return -1;
	akz_fds_close_pair(d->mosq);
	/* libmosquitto 2.0 defaults to applying its own settings on top of a given context, and
	 * then refuses to connect without a cafile: the context is complete, so switch that off. */
	mosquitto_int_option(d->mosq, MOSQ_OPT_SSL_CTX_WITH_DEFAULTS, 0);
	mosquitto_void_option(d->mosq, MOSQ_OPT_SSL_CTX, b->ssl_ctx);
	mosquitto_int_option(d->mosq, MOSQ_OPT_TCP_NODELAY, 1);
	mosquitto_int_option(d->mosq, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V311);
	mosquitto_max_inflight_messages_set(d->mosq, AKZ_WINDOW);
	mosquitto_connect_callback_set(d->mosq, on_connect);
	mosquitto_disconnect_callback_set(d->mosq, on_disconnect);
	mosquitto_publish_callback_set(d->mosq, on_publish);
	mosquitto_message_callback_set(d->mosq, on_message);
	return 0;
}

/* Mints a fresh token (or takes the one the key thread signed, dev_timer) and starts connecting
 * to the next upstream address; tells the state machine whether the connection is under way.
 * Never blocks on the network: the name was looked up beforehand (resolver.c). */
static void start_connect(struct dev *d)
{
	struct akz_bridge *b = d->b;
	char err[256];

	if(d->mosq == NULL && create_client(d)){
		conn_event(d, AKZ_CONN_START_FAILED, 0, "out of memory creating the upstream client");
		return;
	}
	if(akz_resolver_pick(b->resolver, d->addr, err, sizeof(err)) != AKZ_RESOLVE_OK){
		d->addr[0] = '\0';
		conn_event(d, AKZ_CONN_START_FAILED, 0, err);   /* PENDING does not get here: grant_slots */
		return;
	}
	time_t iat;
	char *token = akz_mint_take(&d->mint, d->key, b->audience, d->id, time(NULL), b->lifetime, &iat,
			err, sizeof(err));
	if(token == NULL){
		conn_event(d, AKZ_CONN_START_FAILED, 0, err);
		return;
	}
	int rc = mosquitto_username_pw_set(d->mosq, b->username, token);
	akz_free_secret(token);
	if(rc != MOSQ_ERR_SUCCESS){
		conn_event(d, AKZ_CONN_START_FAILED, 0, mosquitto_strerror(rc));
		return;
	}
	pthread_mutex_lock(&b->lock);
	d->status.token_expires = iat + b->lifetime;
	pthread_mutex_unlock(&b->lock);
	d->last_log[0] = '\0';
	mosquitto_log_callback_set(d->mosq, on_log);   /* until CONNACK: see on_connect */
	/* The connect closes any old socket (a zombie included) and opens a new one, which may
	 * get the same number: take the old one out of the epoll set first. */
	akz_ev_io_watch(b->loop, &d->io, -1, 0);
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
		conn_event(d, AKZ_CONN_START_FAILED, 0, why);
		update_interest(d);
		return;
	}
	akz_ev_timer_arm(b->loop, &b->trim_timer, akz_mono_ms() + TRIM_AFTER_MS);
	conn_event(d, AKZ_CONN_STARTED, 0, NULL);
	update_interest(d);
}

/* Puts d at the end of the queue for a connect slot. */
static void queue_for_slot(struct dev *d)
{
	struct akz_bridge *b = d->b;
	if(d->in_slot_queue) return;
	d->in_slot_queue = true;
	d->slot_next = NULL;
	*b->slot_tail = d;
	b->slot_tail = &d->slot_next;
	b->slots_changed = true;
}

/* Takes the first device off the slot queue. */
static struct dev *pop_slot(struct akz_bridge *b)
{
	struct dev *d = b->slot_queue;
	b->slot_queue = d->slot_next;
	if(b->slot_queue == NULL) b->slot_tail = &b->slot_queue;
	d->in_slot_queue = false;
	return d;
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

/* Takes one connect permit from the token bucket (connect_rate a second). Returns 0, or the ms
 * until the next permit. */
static int64_t take_connect_permit(struct akz_bridge *b, int64_t now)
{
	b->bucket += (double)(now - b->bucket_ms) * b->connect_rate / 1000.0;
	b->bucket_ms = now;
	if(b->bucket > b->connect_rate) b->bucket = b->connect_rate;
	if(b->bucket < 1.0) return (int64_t)((1.0 - b->bucket) * 1000.0 / b->connect_rate) + 1;
	b->bucket -= 1.0;
	return 0;
}

/* Starts the connections of the devices waiting for a slot, first come first, as far as the
 * connect rate, the cap on handshakes at once (each holds tens of KB of TLS buffers, and
 * hundreds at once scatter the devices' long-lived objects over the heap), the first name
 * lookup and the pilot connection allow. */
static void grant_slots(struct akz_bridge *b)
{
	int64_t now = akz_mono_ms();

	b->slots_changed = false;
	while(b->slot_queue){
		if(!b->slot_queue->conn.waiting_slot){   /* disabled or restarted meanwhile */
			pop_slot(b);
			continue;
		}
		if(b->handshakes >= b->max_handshakes) return;   /* a handshake's end calls again */
		if(akz_resolver_state(b->resolver) == AKZ_RESOLVE_PENDING || pilot_holds(b, now)){
			akz_ev_timer_arm_by(b->loop, &b->slot_timer, now + SLOT_RECHECK_MS);
			return;
		}
		int64_t wait = take_connect_permit(b, now);
		if(wait){
			akz_ev_timer_arm_by(b->loop, &b->slot_timer, now + wait);
			return;
		}
		if(b->pilot_until == 0) b->pilot_until = now + PILOT_MS;
		start_connect(pop_slot(b));
	}
}

static void on_slot_timer(struct akz_ev_timer *t, int64_t now)
{
	(void)now;
	grant_slots(akz_container_of(t, struct akz_bridge, slot_timer));
}

/* ---- reading ------------------------------------------------------------------------------------ */

/* True if OpenSSL holds input of the device that libmosquitto has not taken yet. */
static bool tls_holds_input(struct dev *d)
{
	SSL *ssl = mosquitto_ssl_get(d->mosq);
	return ssl && SSL_has_pending(ssl) == 1;
}

/* Reads what the device's socket and OpenSSL hold. With read-ahead (tls.c) OpenSSL keeps whole
 * records that libmosquitto has not asked for yet (it reads a packet count, not to the end),
 * and epoll cannot see them: reading goes on until none is left, or, after READ_ROUNDS calls
 * (a peer that keeps the link full), the device is read again next turn. */
static void read_socket(struct dev *d)
{
	check_socket(d, mosquitto_loop_read(d->mosq, AKZ_WINDOW));
	for(int i = 0; d->io.fd >= 0 && tls_holds_input(d); i++){
		if(i == READ_ROUNDS){
			if(!d->in_reread){
				d->in_reread = true;
				d->reread_next = d->b->reread;
				d->b->reread = d;
			}
			return;
		}
		check_socket(d, mosquitto_loop_read(d->mosq, AKZ_WINDOW));
	}
}

/* What follows a read or a write: the PUBACKs it took are counted, a token refresh that waited
 * for them goes on, and the window's free slots are refilled. */
static void after_io(struct dev *d)
{
	if(d->acked){
		count_done(d, (size_t)d->acked, 0);
		d->acked = 0;
		if(d->conn.refreshing && refresh_ready(d)) conn_event(d, AKZ_CONN_DRAINED, 0, NULL);
	}
	pump_uplinks(d);
	note_output(d);
	update_interest(d);
}

static void handle_io(struct dev *d, uint32_t events)
{
	if(d->mosq == NULL || d->io.fd < 0) return;
	/* libmosquitto advances a TLS handshake only in loop_read, also when the handshake waits to
	 * write (loop_write does nothing then): while connecting, a writable socket is read too. */
	if(handshaking(&d->conn)) events |= EPOLLIN;
	if(events & (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP)){
		read_socket(d);
		/* During the TLS handshake libmosquitto takes a closed connection for "try again":
		 * with a level-triggered epoll that would spin, so the end is taken as final here. */
		if(d->io.fd >= 0 && handshaking(&d->conn) && (events & (EPOLLERR | EPOLLHUP | EPOLLRDHUP))){
			fail_connection(d, "connection closed during the handshake", MOSQ_ERR_CONN_LOST);
		}
	}
	if((events & EPOLLOUT) && d->io.fd >= 0 && (!d->out_blocked || flush_output(d))){
		check_socket(d, mosquitto_loop_write(d->mosq, AKZ_WINDOW));
	}
	after_io(d);
}

static void on_io(struct akz_ev_io *io, uint32_t events)
{
	struct dev *d = akz_container_of(io, struct dev, io);
	if(d->mosq && (events & (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP))){
		akz_tlsio_readable(mosquitto_ssl_get(d->mosq));
	}
	handle_io(d, events);
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

/* ---- the device's timer ---------------------------------------------------------------------------- */

/* When the device next needs the thread's attention without an event: its state machine's
 * deadline, libmosquitto's keepalive (a PINGREQ is due once nothing was written for keepalive
 * seconds: libmosquitto counts in whole seconds, hence the second added), the PUBACK the window
 * waits for, a status held back, the TTL of the oldest uplink waiting for a connection. */
static int64_t dev_next_due(struct dev *d)
{
	struct akz_bridge *b = d->b;
	int64_t due = d->conn.waiting_slot ? INT64_MAX : d->conn.due_ms;
	int64_t now = akz_mono_ms();

	/* A token signed on the key thread is looked for every TOKEN_POLL_MS while it is awaited. */
	if(d->mint && due <= now) due = now + TOKEN_POLL_MS;
#define SOONER(t) do{ int64_t t_ = (t); if(t_ < due) due = t_; }while(0)
	if(d->conn.state == AKZ_CONN_CONNECTED){
		if(d->conn.refreshing && d->mint) SOONER(now + TOKEN_POLL_MS);
		SOONER(d->out_ms + keepalive_ms(b) + 1000);
		if(d->win.count) SOONER(d->acked_ms + keepalive_ms(b) + 1);
	}else if(b->ttl){
		pthread_mutex_lock(&b->lock);
		int64_t oldest = d->pending.head ? d->pending.head->time : INT64_MAX;
		pthread_mutex_unlock(&b->lock);
		if(oldest != INT64_MAX) SOONER(now + (oldest + b->ttl + 1 - (int64_t)time(NULL)) * 1000);
	}
	if(d->status_due) SOONER(d->status_sent_ms + b->status_interval_ms);
#undef SOONER
	return due;
}

/* Arms the device's timer for its next deadline, unless it fires sooner already: a timer that
 * fires early finds nothing due and is armed again (dev_timer), which is cheaper than moving
 * it at every write or PUBACK. */
static void dev_arm(struct dev *d)
{
	if(!d->adopted) return;
	int64_t due = dev_next_due(d);
	if(due != INT64_MAX) akz_ev_timer_arm_by(d->b->loop, &d->timer, due);
}

/* A connected device's periodic checks: libmosquitto's keepalive (it sends PINGREQ, or closes a
 * connection whose PINGRESP did not come) and liveness: alive means acknowledged, so a socket
 * that takes uplinks and answers nothing is dead. */
static void check_connected(struct dev *d, int64_t now)
{
	struct akz_bridge *b = d->b;
	if(d->mosq == NULL || d->io.fd < 0) return;
	if(now >= d->out_ms + keepalive_ms(b) + 1000){
		d->out_ms = now;
		check_socket(d, mosquitto_loop_misc(d->mosq));
		note_output(d);
		if(d->conn.state != AKZ_CONN_CONNECTED) return;
	}
	if(d->win.count > 0 && now - d->acked_ms > keepalive_ms(b)){
		blog(b, MOSQ_LOG_WARNING, "akenza: device '%s': no PUBACK for %d s: reconnecting", d->id, b->keepalive);
		fail_connection(d, "no PUBACK from akenza", MOSQ_ERR_KEEPALIVE);
	}
}

/* The state machine's deadline has come. A connect, and a token refresh, wait for the next token
 * when the key thread signs it (a key in a TPM): a waiting device asks for a connect slot only
 * once it is ready, and one that cannot get it backs off. */
static void conn_due(struct dev *d)
{
	char err[512];
	bool connected = d->conn.state == AKZ_CONN_CONNECTED;
	/* A connection under way, and a drain under way, have their token already. */
	bool wants_token = connected ? !d->conn.refreshing : !d->conn.linked;
	enum akz_mint_rc rc = wants_token ? poll_token(d, err, sizeof(err)) : AKZ_MINT_DONE;

	if(!connected && rc == AKZ_MINT_FAILED) conn_event(d, AKZ_CONN_START_FAILED, 0, err);
	else if(connected || rc == AKZ_MINT_DONE) conn_step(d, AKZ_CONN_TIMER, 0, NULL, rc == AKZ_MINT_PENDING);
	/* else still being signed: dev_arm looks again in TOKEN_POLL_MS */
}

static void dev_timer(struct akz_ev_timer *t, int64_t now)
{
	struct dev *d = akz_container_of(t, struct dev, timer);

	if(!d->conn.waiting_slot && now >= d->conn.due_ms) conn_due(d);
	else if(d->conn.refreshing && refresh_ready(d)) conn_event(d, AKZ_CONN_DRAINED, 0, NULL);
	if(d->conn.state == AKZ_CONN_CONNECTED){
		check_connected(d, now);
	}else{
		expire_pending(d);
	}
	if(d->status_due && now - d->status_sent_ms >= d->b->status_interval_ms) send_status(d, now);
	dev_arm(d);
}

/* ---- what the broker thread hands over ---------------------------------------------------------- */

/* Starts running a new device. */
static void adopt(struct dev *d, bool enabled)
{
	struct akz_bridge *b = d->b;
	d->adopted = true;
	d->prev = NULL;
	d->next = b->devs;
	if(b->devs) b->devs->prev = d;
	b->devs = d;
	d->io.fn = on_io;
	d->timer.fn = dev_timer;
	akz_conn_init(&d->conn, enabled, (int64_t)b->lifetime * 1000, akz_mono_ms());
	b->nstate[d->conn.state]++;
	status_changed(d);
	dev_arm(d);
}

/* Stops running a device that left the registry, and frees it. */
static void remove_dev(struct dev *d)
{
	struct akz_bridge *b = d->b;
	if(d->adopted){
		if(d->prev) d->prev->next = d->next;
		else b->devs = d->next;
		if(d->next) d->next->prev = d->prev;
		b->nstate[d->conn.state]--;
	}
	blog(b, MOSQ_LOG_NOTICE, "akenza: device '%s' left the bridge", d->id);
	bridge_destroy_dev(d);
}

/* Applies a registry change (enabled, a new key) or a reconnect asked for through the control
 * API: connected devices reconnect, waiting ones try again now with a fresh backoff. */
static void apply_change(struct dev *d, bool enabled, struct akz_key *nk, bool reconnect)
{
	if(nk){
		akz_key_unref(d->key);
		d->key = nk;
		blog(d->b, MOSQ_LOG_NOTICE, "akenza: device '%s': key changed (kid %s): reconnecting",
				d->id, akz_key_kid(nk));
	}
	if(!enabled) conn_event(d, AKZ_CONN_DISABLE, 0, NULL);
	else if(d->conn.state == AKZ_CONN_DISABLED) conn_event(d, AKZ_CONN_ENABLE, 0, NULL);
	else if(nk || reconnect) conn_event(d, AKZ_CONN_RESTART, 0, NULL);
	update_interest(d);
}

/* Takes the devices the broker thread gave work, and does it. A device on the inbox stays
 * there (work != 0) until its work is taken, so the broker thread never rewrites inbox_next
 * of a device on the list taken here. */
static bool take_inbox(void *ctx)
{
	struct akz_bridge *b = ctx;

	pthread_mutex_lock(&b->lock);
	struct dev *list = b->inbox;
	b->inbox = NULL;
	pthread_mutex_unlock(&b->lock);
	bool took = list != NULL;
	while(list){
		struct dev *d = list;
		pthread_mutex_lock(&b->lock);
		list = d->inbox_next;
		unsigned work = d->work;
		d->work = 0;
		bool enabled = d->enabled;
		struct akz_key *nk = d->next_key;
		d->next_key = NULL;
		pthread_mutex_unlock(&b->lock);
		if(work & WORK_REMOVE){
			akz_key_unref(nk);
			remove_dev(d);
			continue;
		}
		if(work & WORK_ADOPT) adopt(d, enabled);
		if(work & (WORK_CHANGED | WORK_RECONNECT)) apply_change(d, enabled, nk, work & WORK_RECONNECT);
		else akz_key_unref(nk);
		if(work & WORK_UPLINKS){
			if(d->conn.state == AKZ_CONN_CONNECTED) pump_uplinks(d);
			else dev_arm(d);   /* the TTL of the oldest may be the next deadline */
		}
	}
	return took;
}

/* ---- the bridge's own timers ------------------------------------------------------------------- */

/* Looks for a wall-clock step (NTP correcting a box that booted without a real-time clock, say)
 * and says so in the log. A wrong clock makes tokens look expired or future-dated to akenza and
 * certificates not yet valid to us: after the step, devices waiting to retry try at once (at
 * the connect rate) and connected devices refresh their tokens. */
static void clock_timer(struct akz_ev_timer *t, int64_t now)
{
	struct akz_bridge *b = akz_container_of(t, struct akz_bridge, clock_timer);
	int64_t off = wall_offset_s(), step = off - b->wall_off;

	b->wall_off = off;
	akz_ev_timer_arm(b->loop, t, now + CLOCK_CHECK_MS);
	if(step <= CLOCK_JUMP_S && step >= -CLOCK_JUMP_S) return;
	blog(b, MOSQ_LOG_NOTICE, "akenza: the wall clock stepped by %" PRId64 " s: devices waiting to "
			"retry connect now, connected devices refresh their tokens", step);
	for(struct dev *d = b->devs; d; d = d->next) conn_event(d, AKZ_CONN_CLOCK_STEP, 0, NULL);
}

/* Once a minute while connections fail, one line on how many devices are out and why they are
 * waiting, since each device's repeated failures go to debug level (akz_conn_out.news). */
static void outage_timer(struct akz_ev_timer *t, int64_t now)
{
	struct akz_bridge *b = akz_container_of(t, struct akz_bridge, outage_timer);
	const size_t *n = b->nstate;
	size_t all = 0;

	akz_ev_timer_arm(b->loop, t, now + OUTAGE_REPORT_MS);
	if(b->failed_since_report == 0) return;
	for(int i = 0; i < AKZ_CONN_NSTATES; i++) all += n[i];
	blog(b, MOSQ_LOG_NOTICE, "akenza: %zu of %zu devices not connected (%zu in backoff, %zu "
			"unauthorized, %zu connecting, %zu disabled); %zu failed attempts in the last minute, "
			"the newest: %s (a device's repeated failures are logged at debug level)",
			all - n[AKZ_CONN_CONNECTED], all, n[AKZ_CONN_BACKOFF], n[AKZ_CONN_UNAUTHORIZED],
			n[AKZ_CONN_CONNECTING], n[AKZ_CONN_DISABLED], b->failed_since_report, b->last_failure);
	b->failed_since_report = 0;
}

/* A connect storm leaves tens of KB per handshake in this thread's malloc arena, which glibc
 * keeps: give it back once the storm is over, for edge boxes with little memory. */
static void trim_timer(struct akz_ev_timer *t, int64_t now)
{
	(void)t;
	(void)now;
	malloc_trim(0);
}

static void repoke_timer(struct akz_ev_timer *t, int64_t now)
{
	struct akz_bridge *b = akz_container_of(t, struct akz_bridge, repoke_timer);
	int ms = akz_wakeup_recheck(b->wakeup);
	if(ms >= 0) akz_ev_timer_arm(b->loop, t, now + ms);
}

/* ---- the loop ---------------------------------------------------------------------------------- */

/* The end of a loop turn: input OpenSSL still holds is read, devices get connect slots, and
 * every write buffer filled this turn goes out. After a light turn the loop pauses. */
static enum akz_ev_wait before_sleep(void *ctx)
{
	struct akz_bridge *b = ctx;
	reread_devices(b);
	if(b->slots_changed) grant_slots(b);
	bool light = flush_outputs(b);
	if(b->reread != NULL) return AKZ_EV_POLL;
	return light && b->light_pause_ms > 0 ? AKZ_EV_PAUSE : AKZ_EV_WATCH;
}

static void report_loop_error(void *ctx, const char *what, int errnum)
{
	struct akz_bridge *b = ctx;
	blog(b, MOSQ_LOG_ERR, "akenza: bridge: %s: %s", what, strerror(errnum));
}

/* Contract in akz_bridge_int.h. */
void *bridge_main(void *arg)
{
	struct akz_bridge *b = arg;
	int64_t now = akz_mono_ms();

	b->bucket_ms = now;
	b->slot_tail = &b->slot_queue;
	b->wall_off = wall_offset_s();
	b->slot_timer.fn = on_slot_timer;
	b->clock_timer.fn = clock_timer;
	b->outage_timer.fn = outage_timer;
	b->trim_timer.fn = trim_timer;
	b->repoke_timer.fn = repoke_timer;
	akz_ev_timer_arm(b->loop, &b->clock_timer, now + CLOCK_CHECK_MS);
	akz_ev_timer_arm(b->loop, &b->outage_timer, now + OUTAGE_REPORT_MS);
	struct akz_ev_hooks hooks = {.on_wake = take_inbox, .before_sleep = before_sleep,
			.pause_ms = b->light_pause_ms, .ctx = b};
	akz_evloop_run(b->loop, &hooks, report_loop_error);
	return NULL;
}

/* Contract in akz_bridge_int.h. */
void bridge_destroy_dev(struct dev *d)
{
	struct akz_bridge *b = d->b;

	if(handshaking(&d->conn)) b->handshakes--;
	for(struct dev **pp = &b->reread; d->in_reread && *pp; pp = &(*pp)->reread_next){
		if(*pp == d){
			*pp = d->reread_next;
			break;
		}
	}
	for(struct dev **pp = &b->flush; d->in_flush && *pp; pp = &(*pp)->flush_next){
		if(*pp == d){
			*pp = d->flush_next;
			break;
		}
	}
	for(struct dev **pp = &b->slot_queue; d->in_slot_queue && *pp; pp = &(*pp)->slot_next){
		if(*pp == d){
			*pp = d->slot_next;
			if(*pp == NULL) b->slot_tail = pp;
			break;
		}
	}
	if(b->loop) akz_ev_timer_cancel(b->loop, &d->timer);
	if(d->mosq) mosquitto_destroy(d->mosq);   /* closes the socket, which leaves the epoll set */
	akz_mint_cancel(&d->mint);
	akz_key_unref(d->key);
	akz_key_unref(d->next_key);
	struct akz_msgq back = {0};
	akz_window_give_back(&d->win, &d->pending, &back);
	if(d->sd && back.count) akz_spool_give_back(b->spool, d->sd, &back);
	else akz_msgq_clear(&back);
	free(d->id);
	free(d);
}
