/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_bridge.h - the upstream side: one akenza connection per device, driven by one thread. */
#ifndef AKZ_BRIDGE_H
#define AKZ_BRIDGE_H

#include <stddef.h>
#include <stdint.h>

struct akz_config;
struct akz_registry;
struct akz_bridge;

/* Result of handing an uplink to the bridge. */
enum akz_uplink_result {
	AKZ_UPLINK_QUEUED = 0,   /* accepted: it will reach akenza */
	AKZ_UPLINK_FULL = 1,     /* the device's queue is full: the publisher must keep the message */
	AKZ_UPLINK_UNKNOWN = 2,  /* no enabled device with that id: not relayed */
	AKZ_UPLINK_NOMEM = 3,
	AKZ_UPLINK_SPOOL_FULL = 4, /* the device's share of the spool, or the spool, is full */
	AKZ_UPLINK_SPOOL_IO = 5,   /* the spool could not write it (disk full, I/O error) */
};

/* Creates the bridge and starts its thread. The bridge copies what it needs from cfg.
 * Returns 0, or -1 with a reason in err. Broker thread. */
int akz_bridge_start(const struct akz_config *cfg, struct akz_bridge **out, char *err, size_t errlen);

/* Stops the thread, closes every upstream connection and frees the bridge. NULL is ignored. */
void akz_bridge_stop(struct akz_bridge *bridge);

/* Makes the set of upstream devices match the registry's enabled devices: adds new ones,
 * removes deleted or disabled ones, reconnects those whose key changed, and leaves the others
 * untouched. Broker thread. Returns 0, or -1 when out of memory (nothing changed then). */
int akz_bridge_sync(struct akz_bridge *bridge, const struct akz_registry *reg);

/* Hands one uplink (topic /up/device/id/<device_id>[/...]) to the bridge, and to the spool
 * first when there is one: AKZ_UPLINK_QUEUED means it is kept until akenza acknowledges it.
 * corr (may be NULL) is the MQTT v5 correlation data, echoed in the delivery receipt. Copies what
 * it keeps. Broker thread. */
enum akz_uplink_result akz_bridge_uplink(struct akz_bridge *bridge, const char *device_id,
		size_t idlen, const char *topic, const void *payload, uint32_t payloadlen, int qos,
		const void *corr, uint16_t corrlen);

/* Broker thread, from the TICK callback: publishes received downlinks locally and the status
 * topics that changed. */
void akz_bridge_tick(struct akz_bridge *bridge);

/* Broker thread, from callbacks that run without TICKs (authentication, messages): if the broker
 * has not called TICK since the bridge started (Mosquitto 2.0 never does with
 * per_listener_settings true), says so in the log once, and writes out the bridge's log lines,
 * which otherwise wait for the TICK. Cheap once a TICK has run; NULL is ignored. */
void akz_bridge_check_tick(struct akz_bridge *bridge);

/* ---- control API hooks ---- */
struct akz_status_dev;
struct akz_status_summary;

/* Copies the live state of device id (state, since, token_expires, queued, kid, last_error)
 * into out. Broker thread. Returns 0, or -1 if the bridge has no such device. */
int akz_bridge_device_status(struct akz_bridge *bridge, const char *id, struct akz_status_dev *out);

/* Asks the bridge thread to drop device id's connection and connect again at once (a device in
 * backoff tries again now). Broker thread. Returns 0, or -1 if there is no such enabled device. */
int akz_bridge_reconnect(struct akz_bridge *bridge, const char *id);

/* Copies the bridge's totals into out. Broker thread. Never fails. */
void akz_bridge_summary(struct akz_bridge *bridge, struct akz_status_summary *out);

#endif
