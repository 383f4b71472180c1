/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* status.c - retained $SYS/broker/akenza/ status topics: JSON (cJSON) and one number per counter. */
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cJSON.h>
#include "akz_mosquitto.h"
#include "akz_status.h"
#include "akz_util.h"

bool akz_status_device_fields(cJSON *o, const struct akz_status_dev *s, const char *kid_field)
{
	return cJSON_AddStringToObject(o, "state", s->state ? s->state : "unknown")
			&& cJSON_AddNumberToObject(o, "since", (double)s->since)
			&& cJSON_AddNumberToObject(o, "token_expires", (double)s->token_expires)
			&& cJSON_AddNumberToObject(o, "queued", (double)s->queued)
			&& cJSON_AddNumberToObject(o, "spool_bytes", (double)s->spool_bytes)
			&& cJSON_AddNumberToObject(o, "spool_msgs", (double)s->spool_msgs)
			&& cJSON_AddStringToObject(o, kid_field, s->kid)
			&& cJSON_AddStringToObject(o, "last_error", s->last_error);
}

char *akz_status_device_json(const struct akz_status_dev *s)
{
	cJSON *o = cJSON_CreateObject();
	char *out = o && akz_status_device_fields(o, s, "kid") ? cJSON_PrintUnformatted(o) : NULL;
	cJSON_Delete(o);
	return out;
}

/* Publishes text (may be NULL: out of memory, logged) retained on topic and frees it. */
static void publish_retained(const char *topic, char *text)
{
	if(text == NULL){
		mosquitto_log_printf(MOSQ_LOG_ERR, "akenza: out of memory rendering %s", akz_esc(topic));
		return;
	}
	int rc = mosquitto_broker_publish_copy(NULL, topic, (int)strlen(text), text, 0, true, NULL);
	if(rc != MOSQ_ERR_SUCCESS){
		mosquitto_log_printf(MOSQ_LOG_ERR, "akenza: cannot publish %s: %s", akz_esc(topic), mosquitto_strerror(rc));
	}
	free(text);
}

void akz_status_publish_device(const char *id, const struct akz_status_dev *s)
{
	char topic[AKZ_STATUS_ID_MAX + 64];
	snprintf(topic, sizeof(topic), AKZ_STATUS_PREFIX "devices/%s", id);
	publish_retained(topic, akz_status_device_json(s));
}

/* The summary's counters: the name in the JSON, the topic of its own under AKZ_STATUS_PREFIX,
 * and where the value is. One table serves both, so they cannot drift apart. The topics avoid
 * devices/, whose levels are device ids. */
#define SUM(f) offsetof(struct akz_status_summary, f)
static const struct counter {
	const char *name;
	const char *topic;
	size_t off;
} counters[] = {
	{"devices", "upstream/devices", SUM(devices)},
	{"connected", "upstream/connected", SUM(connected)},
	{"uplinks", "uplinks/relayed", SUM(uplinks)},
	{"downlinks", "downlinks/relayed", SUM(downlinks)},
	{"queued", "uplinks/queued", SUM(queued)},
	{"refused", "uplinks/refused", SUM(refused)},
	{"expired", "uplinks/expired", SUM(expired)},
	{"orphaned", "uplinks/orphaned", SUM(orphaned)},
	{"errors", "errors", SUM(errors)},
	{"connects", "upstream/connects", SUM(connects)},
	{"tls_resumed", "upstream/tls_resumed", SUM(tls_resumed)},
	{"spool_bytes", "spool/bytes", SUM(spool.bytes)},
	{"spool_msgs", "spool/messages", SUM(spool.msgs)},
	{"spool_disk_bytes", "spool/disk_bytes", SUM(spool.disk_bytes)},
	{"spool_segments", "spool/segments", SUM(spool.segments)},
	{"spool_replayed", "spool/replayed", SUM(spool.replayed)},
	{"spool_io_errors", "spool/io_errors", SUM(spool.io_errors)},
};
#undef SUM
#define NCOUNTERS (sizeof(counters)/sizeof(counters[0]))

static uint64_t counter_value(const struct akz_status_summary *s, const struct counter *c)
{
	uint64_t v;
	memcpy(&v, (const unsigned char *)s + c->off, sizeof(v));
	return v;
}

cJSON *akz_status_summary_object(const struct akz_status_summary *s)
{
	cJSON *o = cJSON_CreateObject();
	if(o == NULL) return NULL;
	for(size_t i = 0; i < NCOUNTERS; i++){
		if(cJSON_AddNumberToObject(o, counters[i].name, (double)counter_value(s, &counters[i])) == NULL){
			cJSON_Delete(o);
			return NULL;
		}
	}
	return o;
}

char *akz_status_summary_json(const struct akz_status_summary *s)
{
	cJSON *o = akz_status_summary_object(s);
	if(o == NULL) return NULL;
	char *out = cJSON_PrintUnformatted(o);
	cJSON_Delete(o);
	return out;
}

/* Publishes each counter that differs from what *sent holds (all of them the first time) on its
 * own topic, as Mosquitto's $SYS tree does: retained, the number in decimal as the payload,
 * which is what $SYS readers such as mosquitto-exporter take (one gauge per topic). */
static void publish_counters(const struct akz_status_summary *s, struct akz_status_sent *sent)
{
	for(size_t i = 0; i < NCOUNTERS; i++){
		uint64_t v = counter_value(s, &counters[i]);
		if(sent->any && v == counter_value(&sent->sum, &counters[i])) continue;
		char topic[96], text[24];
		snprintf(topic, sizeof(topic), AKZ_STATUS_PREFIX "%s", counters[i].topic);
		snprintf(text, sizeof(text), "%" PRIu64, v);
		int rc = mosquitto_broker_publish_copy(NULL, topic, (int)strlen(text), text, 0, true, NULL);
		if(rc != MOSQ_ERR_SUCCESS){
			mosquitto_log_printf(MOSQ_LOG_ERR, "akenza: cannot publish %s: %s", topic, mosquitto_strerror(rc));
			return;   /* what is in *sent stays, so the next summary tries again */
		}
	}
	sent->sum = *s;
	sent->any = true;
}

void akz_status_publish_summary(const struct akz_status_summary *s, struct akz_status_sent *sent)
{
	publish_retained(AKZ_STATUS_PREFIX "summary", akz_status_summary_json(s));
	publish_counters(s, sent);
}

void akz_status_clear_device(const char *id)
{
	char topic[AKZ_STATUS_ID_MAX + 64];
	snprintf(topic, sizeof(topic), AKZ_STATUS_PREFIX "devices/%s", id);
	/* An empty retained message removes the retained status. */
	int rc = mosquitto_broker_publish_copy(NULL, topic, 0, NULL, 0, true, NULL);
	if(rc != MOSQ_ERR_SUCCESS){
		mosquitto_log_printf(MOSQ_LOG_ERR, "akenza: cannot clear %s: %s", akz_esc(topic), mosquitto_strerror(rc));
	}
}
