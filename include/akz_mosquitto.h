/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_mosquitto.h - Mosquitto's headers as 2.0 and 2.1 lay them out: include this, not theirs. */
#ifndef AKZ_MOSQUITTO_H
#define AKZ_MOSQUITTO_H

/* 2.0 splits the API over mosquitto.h, mosquitto_broker.h, mosquitto_plugin.h and
 * mqtt_protocol.h; 2.1 gathers it under mosquitto.h and makes the others #warning (an error
 * with -Werror). What the plugin must do differently inside a 2.1 broker is decided at run
 * time (akz_compat.h), since a plugin built against either set may be loaded into either. */
#include <mosquitto.h>
#if LIBMOSQUITTO_MAJOR == 2 && LIBMOSQUITTO_MINOR == 0
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>
#include <mqtt_protocol.h>
#define AKZ_EVT_MESSAGE_IN MOSQ_EVT_MESSAGE
#else
#define AKZ_EVT_MESSAGE_IN MOSQ_EVT_MESSAGE_IN   /* 2.1's name for 2.0's MOSQ_EVT_MESSAGE */
#endif

#endif
