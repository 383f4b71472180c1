/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_plugin.h - the plugin instance: what the broker callbacks share. */
#ifndef AKZ_PLUGIN_H
#define AKZ_PLUGIN_H

#include <stdbool.h>
#include "akz_config.h"

struct akz_registry;
struct akz_auth;
struct akz_bridge;
typedef struct mosquitto_plugin_id_t mosquitto_plugin_id_t;

/* One instance per `plugin` line (per listener with per_listener_settings); no globals, so
 * several instances in one broker do not share state. Everything here belongs to the broker
 * thread, except what akz_bridge guards itself. */
struct akz_plugin {
	mosquitto_plugin_id_t *id;
	struct akz_config cfg;
	struct akz_registry *reg;   /* the registry in force */
	struct akz_auth *auth;
	struct akz_bridge *bridge;  /* NULL when plugin_opt_bridge is false */
	bool control_registered;    /* the $CONTROL/akenza/v1 callback is ours to unregister */
};

#define AKZ_VERSION "0.1.0"

/* Puts reg in force as SIGHUP does: syncs the bridge (new, removed, disabled devices, changed
 * keys), forgets cached logins and disconnects local clients of removed or disabled devices and
 * of changed passwords. Takes reg in every case. Broker thread.
 * Returns 0, or -1 when the bridge ran out of memory (reg is freed, the old registry stays). */
int akz_plugin_apply_registry(struct akz_plugin *p, struct akz_registry *reg);

#endif
