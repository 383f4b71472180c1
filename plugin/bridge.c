/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* bridge.c - the upstream side, as the broker thread sees it: uplinks in; downlinks, receipts,
 * statuses and log lines out; registry syncs; start and stop. The bridge thread, which owns
 * every upstream connection, is bridge_loop.c; the threads and their rules: docs/DESIGN.md. */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
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
#include "akz_util.h"
#include "akz_wakeup.h"

/* Items the hand-off queue holds for the broker thread, by kind: messages (downlinks and
 * receipts), statuses (a fleet changing state at once), log lines (a fleet reconnecting). */
static const size_t HANDOFF_MAX[AKZ_HANDOFF_KINDS] = {
	[AKZ_HANDOFF_MESSAGE] = 10000, [AKZ_HANDOFF_STATUS] = 100000, [AKZ_HANDOFF_LOG] = 20000,
};

/* ---- the device table (b->devices, under b->lock) ---------------------------------------- */

static struct dev *find_locked(const struct akz_bridge *b, const char *id, size_t len)
{
	struct akz_htab_node *n = akz_htab_find(&b->devices, id, len);
	return n ? akz_container_of(n, struct dev, node) : NULL;
}

/* Gives the bridge thread work on d. Caller holds b->lock, and wakes the bridge thread after
 * unlocking (akz_evloop_wake: one wake-up for all that is handed over before it looks), not
 * before: woken under the lock, the bridge thread would at once sleep again waiting for it. */
static void post_locked(struct akz_bridge *b, struct dev *d, unsigned work)
{
	if(d->work == 0){
		d->inbox_next = b->inbox;
		b->inbox = d;
	}
	d->work |= work;
}

void bridge_status_copy_locked(const struct dev *d, struct akz_status_dev *out)
{
	*out = d->status;
	out->queued = d->unacked;
}

/* ---- uplinks ------------------------------------------------------------------------------ */

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
	bool spool = d->sd && (qos > 0 || b->spool_qos0);
	if(!full && spool){
		/* On disk before the broker acknowledges it, and not under the lock the bridge thread
		 * needs. Only this thread appends and removes devices, so d stays valid and the spool's
		 * seqs follow the queue's order. */
		pthread_mutex_unlock(&b->lock);
		enum akz_spool_rc rc = akz_spool_append(b->spool, d->sd, m);
		if(rc != AKZ_SPOOL_OK){
			count_refused(b);
			free(m);
			return rc == AKZ_SPOOL_IO ? AKZ_UPLINK_SPOOL_IO : AKZ_UPLINK_SPOOL_FULL;
		}
		pthread_mutex_lock(&b->lock);
	}
	if(full){
		b->sum.refused++;
		b->sum_dirty = true;
		pthread_mutex_unlock(&b->lock);
		free(m);
		return AKZ_UPLINK_FULL;
	}
	akz_msgq_push(&d->pending, m);
	d->unacked++;
	b->sum.queued++;
	b->sum_dirty = true;
	bool wake = !d->acks_will_pump;
	if(wake) post_locked(b, d, WORK_UPLINKS);
	pthread_mutex_unlock(&b->lock);
	if(wake) akz_evloop_wake(b->loop);
	return AKZ_UPLINK_QUEUED;
}

/* ---- registry syncs -------------------------------------------------------------------------- */

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
	d->zombie_fd = -1;
	d->io.fd = -1;
	d->enabled = rd->enabled;
	d->key = akz_key_ref(rd->key);
	if(b->spool){
		d->sd = akz_spool_device(b->spool, rd->id, strlen(rd->id));
		if(d->sd == NULL){
			bridge_destroy_dev(d);
			return NULL;
		}
		/* What the spool recovered for it goes first, in the order the device sent it. */
		akz_spool_take_backlog(b->spool, d->sd, &d->pending);
		d->unacked = d->pending.count;
		if(d->pending.head) d->win.sent_upto = d->pending.head->seq - 1;
	}
	d->status.state = akz_conn_state_names[rd->enabled ? AKZ_CONN_CONNECTING : AKZ_CONN_DISABLED];
	d->status.since = time(NULL);
	snprintf(d->status.kid, sizeof(d->status.kid), "%s", akz_key_kid(rd->key));
	return d;
}

/* Hands a registry change of an existing device to the bridge thread. Caller holds b->lock. */
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
	post_locked(b, d, WORK_CHANGED);
}

/* Takes d out of the table and hands it to the bridge thread to free. Caller holds b->lock. */
static void remove_locked(struct akz_bridge *b, struct dev *d)
{
	akz_htab_remove(&b->devices, &d->node);
	d->removed = true;
	size_t dropped = d->unacked;
	b->sum.queued -= dropped;
	b->sum.devices--;
	if(d->status.state == akz_conn_state_names[AKZ_CONN_CONNECTED]) b->sum.connected--;
	b->sum_dirty = true;
	if(dropped){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "akenza: device '%s' removed with %zu uplinks not "
				"yet acknowledged by akenza: %s", akz_esc(d->id), dropped, b->spool
				? "the spool keeps them until it comes back" : "they are discarded");
	}
	akz_status_clear_device(d->id);
	post_locked(b, d, WORK_REMOVE);
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
			PRIu64 " bytes) of device '%s', which is %s: kept until it is back", msgs, bytes, akz_esc(id),
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

	/* Allocate everything first, so that running out of memory changes nothing. Only this
	 * thread changes the table, so what it finds here stays true until it locks again. */
	for(size_t i = 0; i < n; i++){
		const struct akz_device *rd = akz_registry_device_at(reg, i);
		pthread_mutex_lock(&b->lock);
		bool known = find_locked(b, rd->id, strlen(rd->id)) != NULL;
		pthread_mutex_unlock(&b->lock);
		if(known) continue;
		struct dev *d = new_dev(b, rd);
		if(d == NULL) goto nomem;
		d->inbox_next = fresh;
		fresh = d;
		nfresh++;
	}
	pthread_mutex_lock(&b->lock);
	if(akz_htab_reserve(&b->devices, b->devices.count + nfresh)){
		pthread_mutex_unlock(&b->lock);
		goto nomem;
	}
	/* Devices the registry no longer has leave the table; the bridge thread frees them. */
	for(struct akz_htab_node *e = akz_htab_first(&b->devices), *next; e; e = next){
		next = akz_htab_next(&b->devices, e);
		struct dev *d = akz_container_of(e, struct dev, node);
		if(akz_registry_find_device(reg, d->id) == NULL) remove_locked(b, d);
	}
	for(size_t i = 0; i < n; i++){
		const struct akz_device *rd = akz_registry_device_at(reg, i);
		struct dev *d = find_locked(b, rd->id, strlen(rd->id));
		if(d) note_change_locked(b, d, rd);
	}
	while(fresh){
		struct dev *d = fresh;
		fresh = d->inbox_next;
		(void)akz_htab_insert(&b->devices, &d->node, d->id, strlen(d->id));   /* room reserved */
		b->sum.devices++;
		b->sum.queued += d->unacked;
		b->sum_dirty = true;
		post_locked(b, d, WORK_ADOPT);
	}
	pthread_mutex_unlock(&b->lock);
	akz_evloop_wake(b->loop);
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
		fresh = d->inbox_next;
		bridge_destroy_dev(d);   /* never shared: its backlog goes back to the spool */
	}
	return -1;
}

/* ---- what the bridge thread hands over (broker thread) --------------------------------------- */

/* Publishes a downlink or a receipt. Returns true when the broker took it. */
static bool publish_message(const struct akz_msg *m)
{
	mosquitto_property *props = NULL;
	if(m->corrlen && mosquitto_property_add_binary(&props, MQTT_PROP_CORRELATION_DATA, m->corr,
			m->corrlen) != MOSQ_ERR_SUCCESS){
		mosquitto_property_free_all(&props);
	}
	int rc = mosquitto_broker_publish_copy(NULL, m->topic, (int)m->payloadlen, m->payload, m->qos,
			false, props);
	if(rc == MOSQ_ERR_SUCCESS) return true;   /* the broker owns props now */
	mosquitto_property_free_all(&props);
	mosquitto_log_printf(MOSQ_LOG_ERR, "akenza: message on '%s' not published: %s", akz_esc(m->topic),
			mosquitto_strerror(rc));
	return false;
}

/* Publishes a device's status, unless the device left the registry meanwhile (its retained
 * status was cleared then, and must stay so). */
static void publish_status(struct akz_bridge *b, struct akz_handoff_item *it)
{
	pthread_mutex_lock(&b->lock);
	bool known = find_locked(b, it->text, strlen(it->text)) != NULL;
	pthread_mutex_unlock(&b->lock);
	if(!known) return;
	struct akz_status_dev *st = &it->u.status.st;
	/* After the bridge's lock, never under it: docs/DESIGN.md, lock order. */
	if(it->u.status.sd) akz_spool_device_usage(b->spool, it->u.status.sd, &st->spool_bytes, &st->spool_msgs);
	akz_status_publish_device(it->text, st);
}

/* Publishes and logs what the bridge's threads handed over, oldest first, up to
 * DRAIN_BATCH items (a fleet's statuses at start are spread over a few loop turns; the broker is
 * woken for the next turn at once). publish false: logs only (the broker is stopping). */
static void drain_handoff(struct akz_bridge *b, bool publish)
{
	enum { DRAIN_BATCH = 1024 };
	size_t dropped[AKZ_HANDOFF_KINDS];
	size_t relayed = 0;
	bool more = false;

	for(struct akz_handoff_item *it = akz_handoff_take(b->out, DRAIN_BATCH, &more, dropped), *next;
			it; it = next){
		next = it->next;
		switch(it->kind){
		case AKZ_HANDOFF_MESSAGE: relayed += publish && publish_message(it->u.msg); break;
		case AKZ_HANDOFF_STATUS: if(publish) publish_status(b, it); break;
		case AKZ_HANDOFF_LOG: mosquitto_log_printf(it->level, "%s", akz_esc(it->text)); break;   /* one line, whatever it quotes */
		case AKZ_HANDOFF_KINDS: break;
		}
		akz_handoff_item_free(it);
	}
	if(more) akz_wakeup_poke(b->wakeup);
	if(dropped[AKZ_HANDOFF_LOG]){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "akenza: %zu bridge log lines dropped: the broker "
				"thread did not take them fast enough", dropped[AKZ_HANDOFF_LOG]);
	}
	if(dropped[AKZ_HANDOFF_STATUS]){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "akenza: %zu device status updates dropped",
				dropped[AKZ_HANDOFF_STATUS]);
	}
	if(relayed){
		pthread_mutex_lock(&b->lock);
		b->sum.downlinks += relayed;
		b->sum_dirty = true;
		pthread_mutex_unlock(&b->lock);
	}
}

/* Publishes the summary if it changed and status_interval_ms has passed since the last time. */
static void publish_summary(struct akz_bridge *b, int64_t now)
{
	if(now - b->sum_published_ms < b->status_interval_ms) return;
	struct akz_spool_stats spool = {0};
	/* The spool's lock is never taken under the bridge's: docs/DESIGN.md, lock order. */
	if(b->spool) akz_spool_get_stats(b->spool, &spool);
	pthread_mutex_lock(&b->lock);
	/* The spool changes on its own too (the flusher reclaims space): publish that as well. */
	bool due = b->sum_dirty || memcmp(&spool, &b->sum.spool, sizeof(spool)) != 0;
	b->sum.spool = spool;
	struct akz_status_summary s = b->sum;
	b->sum_dirty = false;
	pthread_mutex_unlock(&b->lock);
	if(!due) return;
	b->sum_published_ms = now;
	akz_status_publish_summary(&s, &b->sum_sent);
}

void akz_bridge_tick(struct akz_bridge *b)
{
	/* Acknowledged first, so that a message handed over from here on signals again. What
	 * arrives while this TICK publishes is taken by the next; a signal that lands between the
	 * last look and the broker's epoll_wait is spent, and the bridge thread sends it again when
	 * this acknowledgement does not follow within a few ms (akz_wakeup_recheck). */
	akz_wakeup_ack(b->wakeup);
	int64_t now = akz_mono_ms();
	b->last_tick_ms = now;
	drain_handoff(b, true);
	publish_summary(b, now);
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
				"downlinks, delivery receipts and status topics are published only when a local "
				"client logs in or publishes (uplinks go out as usual); set per_listener_settings false");
	}
	drain_handoff(b, true);
}

/* ---- control API hooks (broker thread) ---------------------------------------------------- */

int akz_bridge_device_status(struct akz_bridge *b, const char *id, struct akz_status_dev *out)
{
	struct akz_spool_dev *sd = NULL;
	pthread_mutex_lock(&b->lock);
	struct dev *d = find_locked(b, id, strlen(id));
	if(d){
		bridge_status_copy_locked(d, out);
		sd = d->sd;
	}
	pthread_mutex_unlock(&b->lock);
	if(sd) akz_spool_device_usage(b->spool, sd, &out->spool_bytes, &out->spool_msgs);
	return d ? 0 : -1;
}

int akz_bridge_reconnect(struct akz_bridge *b, const char *id)
{
	pthread_mutex_lock(&b->lock);
	struct dev *d = find_locked(b, id, strlen(id));
	bool ok = d && d->enabled;
	if(ok) post_locked(b, d, WORK_RECONNECT);
	pthread_mutex_unlock(&b->lock);
	if(ok) akz_evloop_wake(b->loop);
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
	/* Devices never adopted are on the inbox only; the others (removed ones the thread had yet
	 * to free among them) are on b->devs. */
	for(struct dev *d = b->inbox, *next; d; d = next){
		next = d->inbox_next;
		if(!d->adopted) bridge_destroy_dev(d);
	}
	while(b->devs){
		struct dev *d = b->devs;
		b->devs = d->next;
		bridge_destroy_dev(d);
	}
	akz_spool_close(b->spool);
	akz_wakeup_free(b->wakeup);   /* every thread that pokes it has stopped */
	akz_resolver_free(b->resolver);
	if(b->out) drain_handoff(b, false);   /* the last log lines */
	akz_handoff_free(b->out);
	akz_evloop_free(b->loop);
	SSL_CTX_free(b->ssl_ctx);
	if(b->tlsio_ready) akz_tlsio_cleanup();   /* every device's SSL object is freed */
	pthread_mutex_destroy(&b->lock);
	akz_htab_free(&b->devices);
	free(b->host);
	free(b->username);
	free(b->audience);
	free(b->receipts_prefix);
	free(b);
}

/* The spool's log lines go through the hand-off queue: the flusher thread must not call the
 * broker's logger. At open (broker thread) the queue is drained right after. */
static void spool_log(void *ctx, int level, const char *msg)
{
	struct akz_bridge *b = ctx;
	akz_handoff_log(b->out, level, "%s", msg);
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
	drain_handoff(b, false);
	if(rc == 0){
		struct akz_spool_stats st;
		akz_spool_get_stats(b->spool, &st);
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "akenza: spool %s (sync %s): %" PRIu64 " undelivered "
				"uplinks (%" PRIu64 " bytes) recovered in %" PRIu64 " segments", akz_esc(cfg->spool_dir),
				cfg->spool_sync, st.msgs, st.bytes, st.segments);
	}
	return rc;
}

/* Copies what the bridge needs from cfg. Returns 0, or -1 when out of memory. */
static int copy_config(struct akz_bridge *b, const struct akz_config *cfg)
{
	b->host = strdup(cfg->upstream_host);
	b->username = strdup(cfg->upstream_username);
	b->receipts_prefix = strdup(cfg->receipts_prefix ? cfg->receipts_prefix : "akenza/receipts/");
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
	b->status_interval_ms = cfg->status_interval_ms;
	b->light_pause_ms = cfg->light_pause_ms;
	return b->host && b->username && b->audience && b->receipts_prefix ? 0 : -1;
}

/* Sets up the broker wake-up for downlinks (plugin_opt_downlink_wakeup signal), or says in the
 * log why downlinks wait for the TICK. */
static void set_up_wakeup(struct akz_bridge *b, const struct akz_config *cfg)
{
	if(cfg->downlink_wakeup == NULL || strcmp(cfg->downlink_wakeup, "signal") != 0) return;
	char why[200];
	if(akz_wakeup_new(&b->wakeup, why, sizeof(why))){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "akenza: plugin_opt_downlink_wakeup signal: %s: "
				"downlinks wait for the broker's TICK (up to 100 ms)", why);
	}
}

int akz_bridge_start(const struct akz_config *cfg, struct akz_bridge **out, char *err, size_t errlen)
{
	*out = NULL;
	struct akz_bridge *b = calloc(1, sizeof(*b));
	if(b == NULL){
		akz_set_err(err, errlen, "out of memory");
		return -1;
	}
	b->started_ms = akz_mono_ms();
	pthread_mutex_init(&b->lock, NULL);
	b->out = akz_handoff_new(HANDOFF_MAX);
	if(copy_config(b, cfg) || b->out == NULL){
		akz_set_err(err, errlen, "out of memory");
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
		akz_set_err(err, errlen, "out of memory");
		goto fail;
	}
	b->tlsio_ready = true;
	if(akz_resolver_new(cfg->upstream_host, cfg->upstream_dns_refresh, &b->resolver, err, errlen)) goto fail;
	if(akz_evloop_new(&b->loop, err, errlen)) goto fail;
	set_up_wakeup(b, cfg);
	if(akz_thread_start(&b->thread, "bridge", bridge_main, b, err, errlen)) goto fail;
	*out = b;
	return 0;
fail:
	free_bridge(b);
	return -1;
}

/* Stops the bridge thread's loop (akz_thread_stop). */
static void tell_stop(void *ctx)
{
	struct akz_bridge *b = ctx;
	akz_evloop_stop(b->loop);
}

void akz_bridge_stop(struct akz_bridge *b)
{
	if(b == NULL) return;
	akz_thread_stop(&b->thread, tell_stop, b);
	size_t unacked = 0;
	pthread_mutex_lock(&b->lock);
	for(struct akz_htab_node *e = akz_htab_first(&b->devices); e; e = akz_htab_next(&b->devices, e)){
		unacked += akz_container_of(e, struct dev, node)->unacked;
	}
	pthread_mutex_unlock(&b->lock);
	if(unacked && b->spool){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "akenza: stopping with %zu uplinks not yet "
				"acknowledged by akenza: they stay in the spool and go out after the restart", unacked);
	}else if(unacked){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "akenza: stopping with %zu uplinks not yet "
				"acknowledged by akenza (in-memory queue: they are lost)", unacked);
	}
	free_bridge(b);
}
