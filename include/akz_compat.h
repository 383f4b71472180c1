/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_compat.h - what the plugin does differently inside a Mosquitto 2.1 broker, decided at run time. */
#ifndef AKZ_COMPAT_H
#define AKZ_COMPAT_H

#include <stdbool.h>

struct mosquitto_evt_message;
struct mosquitto_evt_tick;
typedef struct mosquitto_plugin_id_t mosquitto_plugin_id_t;

/* Tells which broker loaded the plugin (2.0, or 2.1 and later: the 2.1 broker exports
 * mosquitto_plugin_set_info, 2.0's does not) and, in 2.1, gives the broker the plugin's name
 * and version for its log. Broker thread, at plugin init; the answer is the same for every
 * instance. Never fails. */
void akz_compat_init(mosquitto_plugin_id_t *id, const char *name, const char *version);

/* True inside a 2.1 or later broker (after akz_compat_init). */
bool akz_broker_is_21(void);

/* Refuses the PUBLISH of ev's client from a MESSAGE_IN callback: returns the error to return.
 * An MQTT v5 client gets a PUBACK with 0x97 "quota exceeded" from 2.1 (0x87 "not authorized"
 * from 2.0, which does not pass a plugin's reason code on) and keeps the message; an MQTT
 * 3.1.1 client, whose PUBACK cannot say no, is disconnected without one and sends the
 * message again when it reconnects. Never fails. */
int akz_refuse_publish(struct mosquitto_evt_message *ev);

/* Asks 2.1 to call this TICK callback again on every turn of its loop, as 2.0 does (2.0 ignores
 * the request). Call at the end of the TICK callback. Never fails. */
void akz_tick_every_turn(struct mosquitto_evt_tick *ev);

#endif
