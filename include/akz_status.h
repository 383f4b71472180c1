/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_status.h - the bridge's state, retained under $SYS/broker/akenza/. */
#ifndef AKZ_STATUS_H
#define AKZ_STATUS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>
#include "akz_keystore.h"
#include "akz_spool.h"

#define AKZ_STATUS_ID_MAX 192
#define AKZ_STATUS_PREFIX "$SYS/broker/akenza/"

/* One device, as $SYS/broker/akenza/devices/<id> shows it. */
struct akz_status_dev {
	const char *state;          /* static string: connecting, connected, backoff, unauthorized, disabled */
	time_t since;               /* when it entered that state */
	time_t token_expires;       /* exp of the token last used, 0 if none yet */
	size_t queued;              /* uplinks accepted and not yet acknowledged by akenza */
	uint64_t spool_bytes, spool_msgs;  /* of those, in the spool */
	char kid[AKZ_KID_LEN];
	char last_error[240];
};

/* Totals, as $SYS/broker/akenza/summary shows them. */
struct akz_status_summary {
	uint64_t devices, connected;
	uint64_t uplinks, downlinks;   /* relayed (QoS 1 uplinks: acknowledged by akenza) */
	uint64_t queued;
	uint64_t refused;              /* uplinks refused: a queue or the spool was full */
	uint64_t expired;              /* uplinks dropped undelivered by the TTL */
	uint64_t orphaned;             /* spooled uplinks of devices not (or no longer) in the registry */
	uint64_t errors;
	uint64_t connects;             /* upstream connections made (CONNACK accepted) */
	uint64_t tls_resumed;          /* of those, on a resumed TLS session */
	struct akz_spool_stats spool;  /* all zero without a spool */
};

/* Publishes (retained) the device's status. Broker thread. Logs and returns on failure. */
void akz_status_publish_device(const char *id, const struct akz_status_dev *s);

/* What akz_status_publish_summary last published on the counters' own topics (zeroed at start). */
struct akz_status_sent {
	bool any;                       /* false until the first publication */
	struct akz_status_summary sum;
};

/* Publishes (retained) the summary as JSON on $SYS/broker/akenza/summary, and each counter that
 * changed since *sent as a plain number on a topic of its own ($SYS/broker/akenza/uplinks/relayed
 * ...; docs/metrics.md); updates *sent. Broker thread. Logs and returns on failure. */
void akz_status_publish_summary(const struct akz_status_summary *s, struct akz_status_sent *sent);

/* Clears the retained status of a device that left the registry. Broker thread. */
void akz_status_clear_device(const char *id);

struct cJSON;

/* Adds a device's status to o, the one rendering the status topic and the control API share
 * (kid_field names the key id: "kid" on the topic, "upstream_kid" in getDevice, whose "kid" is
 * the registry's). Returns false when out of memory (o may then hold some of the fields). */
bool akz_status_device_fields(struct cJSON *o, const struct akz_status_dev *s, const char *kid_field);

/* The summary as a cJSON object (caller frees with cJSON_Delete), NULL when out of memory. */
struct cJSON *akz_status_summary_object(const struct akz_status_summary *s);

/* Renders the summary as JSON; caller frees with free(). NULL when out of memory. */
char *akz_status_summary_json(const struct akz_status_summary *s);

/* Renders a device status as JSON; caller frees with free(). NULL when out of memory. */
char *akz_status_device_json(const struct akz_status_dev *s);

#endif
