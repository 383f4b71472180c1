/* bridge.c - the upstream side, as the broker thread sees it: uplinks in, downlinks, status
 * and log out, registry syncs, start and stop. The bridge thread itself is in bridge_loop.c. */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>
#include <openssl/ssl.h>
#include "akz_mosquitto.h"
#include "akz_bridge_int.h"
#include "akz_config.h"
#include "akz_fds.h"
#include "akz_jwt.h"
#include "akz_queue.h"
#include "akz_registry.h"
#include "akz_resolver.h"
#include "akz_spool.h"
#include "akz_status.h"
#include "akz_tls.h"
#include "akz_tlsio.h"
#include "akz_topic.h"
#include "akz_util.h"
#include "akz_wakeup.h"

#define LOG_MAX 20000             /* log lines waiting for the broker thread (a fleet reconnecting) */
#define TICK_RECENT_US ((int64_t)20000) /* a TICK this recent will come again: uplinks wait for it */
#define TICK_IDLE_US ((int64_t)300) /* a broker whose last TICK is older was asleep, not busy */

const char *const bridge_state_names[] = {
	[ST_DISABLED] = "disabled", [ST_CONNECTING] = "connecting", [ST_CONNECTED] = "connected",
	[ST_BACKOFF] = "backoff", [ST_UNAUTHORIZED] = "unauthorized",
};

/* ---- hand-offs to the broker thread ----------------------------------------------------- */

/* Contract in akz_bridge_int.h. */
void bridge_log(struct akz_bridge *b, int level, const char *fmt, ...)
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

/* Puts the device on b->ready, for the bridge thread to hand its pending uplinks to
 * libmosquitto. Returns true if the caller must wake the bridge thread (bridge_wake, after
 * unlocking): no wake was pending. Caller holds b->lock; never fails. */
static bool mark_ready_locked(struct akz_bridge *b, struct dev *d)
{
	if(!d->in_ready){
		d->in_ready = true;
		d->ready_next = b->ready;
		b->ready = d;
	}
	bool wake = !b->wake_pending;
	b->wake_pending = true;
	return wake;
}

/* Contract in akz_bridge_int.h. */
void bridge_mark_dirty_locked(struct akz_bridge *b, struct dev *d)
{
	if(!d->in_dirty){
		d->in_dirty = true;
		d->dirty_next = b->dirty;
		b->dirty = d;
	}
	b->sum_dirty = true;
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
	/* A busy device's uplinks mostly arrive while earlier ones are held or its window is full:
	 * the bridge thread takes them then without a wake, which would cost a thread switch and
	 * give it nothing to do (pump_promised). */
	bool direct = b->direct && d->pending.count == 1 && !d->pump_promised && !d->in_ready;
	bool need_wake = !direct && !d->pump_promised && mark_ready_locked(b, d);
	pthread_mutex_unlock(&b->lock);
	/* An idle device's uplink goes out from here, without a thread wake-up (bridge_send_direct).
	 * Only the broker thread queues uplinks, so none can join it meanwhile; the bridge thread
	 * may take it first, which is as good. */
	if(direct && !bridge_send_direct(d)){
		pthread_mutex_lock(&b->lock);
		need_wake = !d->pump_promised && mark_ready_locked(b, d);
		pthread_mutex_unlock(&b->lock);
	}
	/* While TICKs come (every broker loop turn), the bridge thread is woken at the end of the
	 * turn, once for all the uplinks the turn brought: a wake per uplink cost an eventfd write,
	 * an epoll_wait and a thread switch per message. But the first uplink after the broker
	 * slept (its last TICK is older than TICK_IDLE_US: light traffic, where the turn holds
	 * little else) wakes it now, which saves the rest of the turn, ~8 us at the median. Without
	 * recent TICKs at all (per_listener_settings true, where 2.0.11 calls none) every wake is
	 * immediate. */
	if(need_wake){
		int64_t since = akz_mono_us() - b->last_tick_us;
		bool busy = since <= TICK_IDLE_US || b->woke_this_turn;
		if(since <= TICK_RECENT_US && busy){
			b->wake_at_tick = true;
		}else{
			b->woke_this_turn = true;
			bridge_wake(b);
		}
	}
	return AKZ_UPLINK_QUEUED;
}

/* A new device for the bridge thread to adopt. NULL when out of memory. */
static struct dev *new_dev(struct akz_bridge *b, const struct akz_device *rd)
{
	struct dev *d = calloc(1, sizeof(*d));
	if(d == NULL) return NULL;
	if(pthread_mutex_init(&d->io_lock, NULL)){
		free(d);
		return NULL;
	}
	d->id = strdup(rd->id);
	if(d->id == NULL){
		pthread_mutex_destroy(&d->io_lock);
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
			pthread_mutex_destroy(&d->io_lock);
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
	d->status.state = bridge_state_names[d->state];
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
		bridge_mark_dirty_locked(b, d);
	}
	pthread_mutex_unlock(&b->lock);
	bridge_wake(b);
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
		bridge_destroy_dev(d);
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
	if(sum) akz_status_publish_summary(&s, &b->sum_sent);
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
	b->last_tick_us = akz_mono_us();
	b->woke_this_turn = false;
	if(b->wake_at_tick){
		b->wake_at_tick = false;
		bridge_wake(b);
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
	if(b == NULL || b->last_tick_us) return;
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
	if(ok) bridge_wake(b);
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
		bridge_destroy_dev(d);
	}
	while(b->incoming){
		struct dev *d = b->incoming;
		b->incoming = d->incoming_next;
		bridge_destroy_dev(d);
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
	if(b->tlsio_ready) akz_tlsio_cleanup();   /* every device's SSL object is freed */
	pthread_mutex_destroy(&b->lock);
	pthread_mutex_destroy(&b->log_lock);
	free(b->buckets);
	free(b->host);
	free(b->username);
	free(b->audience);
	free(b->receipts_prefix);
	free(b);
}

/* The spool's log lines go through the bridge's queue: the flusher thread must not call the
 * broker's logger. At open (broker thread) the queue is flushed right after. */
static void spool_log(void *ctx, int level, const char *msg)
{
	bridge_log(ctx, level, "%s", msg);
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
	b->audience = strdup(cfg->audience ? cfg->audience : AKZ_AUDIENCE_DEFAULT);
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
	b->coalesce_us = cfg->uplink_coalesce_us;
	b->coalesce_rate = cfg->uplink_coalesce_rate;
	b->direct = cfg->uplink_direct;
	if(b->host == NULL || b->username == NULL || b->audience == NULL || b->receipts_prefix == NULL){
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
	if(akz_tlsio_init()){
		snprintf(err, errlen, "out of memory");
		goto fail;
	}
	b->tlsio_ready = true;
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
		bridge_wake(b);
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
