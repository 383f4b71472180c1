/* status.c - retained $SYS/broker/akenza/ status topics, rendered with cJSON. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cJSON.h>
#include <mosquitto.h>
#include <mosquitto_broker.h>
#include "akz_status.h"

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
		mosquitto_log_printf(MOSQ_LOG_ERR, "akenza: out of memory rendering %s", topic);
		return;
	}
	int rc = mosquitto_broker_publish_copy(NULL, topic, (int)strlen(text), text, 0, true, NULL);
	if(rc != MOSQ_ERR_SUCCESS){
		mosquitto_log_printf(MOSQ_LOG_ERR, "akenza: cannot publish %s: %s", topic, mosquitto_strerror(rc));
	}
	free(text);
}

void akz_status_publish_device(const char *id, const struct akz_status_dev *s)
{
	char topic[AKZ_STATUS_ID_MAX + 64];
	snprintf(topic, sizeof(topic), AKZ_STATUS_PREFIX "devices/%s", id);
	publish_retained(topic, akz_status_device_json(s));
}

cJSON *akz_status_summary_object(const struct akz_status_summary *s)
{
	const struct { const char *name; uint64_t v; } f[] = {
		{"devices", s->devices}, {"connected", s->connected}, {"uplinks", s->uplinks},
		{"downlinks", s->downlinks}, {"queued", s->queued}, {"refused", s->refused},
		{"expired", s->expired}, {"orphaned", s->orphaned}, {"errors", s->errors},
		{"connects", s->connects}, {"tls_resumed", s->tls_resumed},
		{"spool_bytes", s->spool.bytes}, {"spool_msgs", s->spool.msgs},
		{"spool_disk_bytes", s->spool.disk_bytes}, {"spool_segments", s->spool.segments},
		{"spool_replayed", s->spool.replayed}, {"spool_io_errors", s->spool.io_errors},
	};
	cJSON *o = cJSON_CreateObject();
	if(o == NULL) return NULL;
	for(size_t i = 0; i < sizeof(f)/sizeof(f[0]); i++){
		if(cJSON_AddNumberToObject(o, f[i].name, (double)f[i].v) == NULL){
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

void akz_status_publish_summary(const struct akz_status_summary *s)
{
	publish_retained(AKZ_STATUS_PREFIX "summary", akz_status_summary_json(s));
}

void akz_status_clear_device(const char *id)
{
	char topic[AKZ_STATUS_ID_MAX + 64];
	snprintf(topic, sizeof(topic), AKZ_STATUS_PREFIX "devices/%s", id);
	/* An empty retained message removes the retained status. */
	int rc = mosquitto_broker_publish_copy(NULL, topic, 0, NULL, 0, true, NULL);
	if(rc != MOSQ_ERR_SUCCESS){
		mosquitto_log_printf(MOSQ_LOG_ERR, "akenza: cannot clear %s: %s", topic, mosquitto_strerror(rc));
	}
}
