/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* compat.c - what the plugin does differently inside a Mosquitto 2.1 broker, decided at run time. */
#include <dlfcn.h>
#include <stdbool.h>
#include "akz_mosquitto.h"
#include "akz_compat.h"

/* Error numbers as each broker reads them, whichever headers the plugin was built against:
 * 2.1 moved MOSQ_ERR_ADMINISTRATIVE_ACTION from 30 to 152 (MQTT v5's reason code) and added
 * MOSQ_ERR_QUOTA_EXCEEDED. A 2.1 broker takes 30 as an unknown error: it still drops the client,
 * but logs "bad socket read/write: Unknown error". */
enum {
	ERR_ACL_DENIED = 12,             /* MOSQ_ERR_ACL_DENIED, 2.0 and 2.1 */
	ERR_ADMIN_ACTION_20 = 30,        /* MOSQ_ERR_ADMINISTRATIVE_ACTION, 2.0 */
	ERR_ADMIN_ACTION_21 = 152,       /* MOSQ_ERR_ADMINISTRATIVE_ACTION, 2.1 */
	ERR_QUOTA_EXCEEDED_21 = -6,      /* MOSQ_ERR_QUOTA_EXCEEDED, 2.1: PUBACK 0x97 */
};

typedef int (*set_info_fn)(mosquitto_plugin_id_t *, const char *, const char *);

/* Written once at the first instance's init, on the broker thread, before any other thread of
 * the plugin runs; read on the broker thread only. */
static bool broker_21;

void akz_compat_init(mosquitto_plugin_id_t *id, const char *name, const char *version)
{
	/* Looked up, not called: a plugin linked against it would not load into 2.0. 2.1 opens
	 * plugins RTLD_LOCAL, but the broker's own exports are in the global scope. */
	set_info_fn set_info = (set_info_fn)dlsym(RTLD_DEFAULT, "mosquitto_plugin_set_info");
	broker_21 = set_info != NULL;
	if(set_info) (void)set_info(id, name, version);   /* only names us in the broker's log */
}

bool akz_broker_is_21(void)
{
	return broker_21;
}

int akz_refuse_publish(struct mosquitto_evt_message *ev)
{
	if(mosquitto_client_protocol_version(ev->client) == 5){
		if(broker_21) return ERR_QUOTA_EXCEEDED_21;
		ev->reason_code = 0x97;   /* for a broker that passes it on */
		return ERR_ACL_DENIED;
	}
	/* ACL_DENIED would make the broker send a 3.1.1 client a PUBACK, which says "delivered";
	 * any other error drops the connection without one. */
	return broker_21 ? ERR_ADMIN_ACTION_21 : ERR_ADMIN_ACTION_20;
}

/* Why not the next_ms that 2.1 adds to the TICK (src/plugin_tick.c at v2.1.2): the broker calls
 * a TICK callback only on loop turns after the time it asked for, so any delay would keep the
 * TICK off the turns that a downlink's wake-up signal or a burst of uplinks start (the bridge
 * hands over on the next TICK); the delay bounds the loop's sleep only on turns where the TICK
 * ran, and is forgotten when the loop wakes earlier for something else; and the time compared is
 * the wall clock, so after NTP steps the clock back by an hour the TICK would not run for an
 * hour. A next tick due at the epoch is due on every turn whatever the wall clock says. The
 * loop's sleep is bounded by the plugin's own heartbeat instead (akz_wakeup_set_heartbeat). */
void akz_tick_every_turn(struct mosquitto_evt_tick *ev)
{
	if(broker_21) ev->next_s = -ev->now_s;
}
