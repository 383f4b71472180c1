/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_control.h - the $CONTROL/akenza/v1 API: manage devices and gateways of a running broker. */
#ifndef AKZ_CONTROL_H
#define AKZ_CONTROL_H

#define AKZ_CONTROL_TOPIC "$CONTROL/akenza/v1"
#define AKZ_CONTROL_RESPONSE_TOPIC "$CONTROL/akenza/v1/response"
#define AKZ_CONTROL_MAX_PAYLOAD (64 * 1024)

/* The MOSQ_EVT_CONTROL callback for AKZ_CONTROL_TOPIC; userdata is the struct akz_plugin.
 * Runs on the broker thread, after the broker's ACL allowed the publish. Answers every command
 * of the request on AKZ_CONTROL_RESPONSE_TOPIC, errors included, and always returns
 * MOSQ_ERR_SUCCESS (any other value would make the broker drop the requesting client). */
int akz_control_callback(int event, void *event_data, void *userdata);

#endif
