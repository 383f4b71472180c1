/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* fuzz_control.c - libFuzzer target: $CONTROL/akenza/v1 requests (akz_control_callback).
 * control.c runs inside the broker, so the few broker functions it calls are stubbed here: the
 * answer it publishes must be one JSON object with a "responses" array (the oracle), log lines
 * are formatted and dropped, and putting a registry in force just swaps it in. Each input starts
 * from the same registry file (one EC device "dev1", one gateway) in a private directory, so that
 * what one input created or deleted does not leak into the next. */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cJSON.h>
#include "akz_mosquitto.h"
#include "akz_bridge.h"
#include "akz_control.h"
#include "akz_keystore.h"
#include "akz_plugin.h"
#include "akz_registry.h"
#include "akz_status.h"
#include "fuzz_common.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* ---- stubs of the broker ---------------------------------------------------------------- */

/* The broker's logger takes the plugin's formats (the declaration carries no format attribute). */
#pragma clang diagnostic ignored "-Wformat-nonliteral"
void mosquitto_log_printf(int level, const char *fmt, ...)
{
	char line[1024];
	va_list ap;
	(void)level;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
}

const char *mosquitto_client_id(const struct mosquitto *client)
{
	(void)client;
	return "fuzz-client";
}

const char *mosquitto_client_username(const struct mosquitto *client)
{
	(void)client;
	return "admin";
}

int mosquitto_broker_publish(const char *clientid, const char *topic, int payloadlen, void *payload,
		int qos, bool retain, mosquitto_property *properties)
{
	(void)clientid;
	(void)qos;
	(void)retain;
	/* Every request gets an answer, and every answer is a JSON object with its responses. */
	if(strcmp(topic, AKZ_CONTROL_RESPONSE_TOPIC) == 0){
		cJSON *t = cJSON_ParseWithLength(payload, (size_t)payloadlen);
		if(t == NULL || !cJSON_IsArray(cJSON_GetObjectItemCaseSensitive(t, "responses"))) abort();
		cJSON_Delete(t);
	}
	free(payload);
	mosquitto_property_free_all(&properties);
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_broker_publish_copy(const char *clientid, const char *topic, int payloadlen,
		const void *payload, int qos, bool retain, mosquitto_property *properties)
{
	void *copy = malloc(payloadlen > 0 ? (size_t)payloadlen : 1);
	if(copy == NULL) return MOSQ_ERR_NOMEM;
	if(payloadlen > 0) memcpy(copy, payload, (size_t)payloadlen);
	return mosquitto_broker_publish(clientid, topic, payloadlen, copy, qos, retain, properties);
}

int akz_plugin_apply_registry(struct akz_plugin *p, struct akz_registry *reg)
{
	akz_registry_free(p->reg);
	p->reg = reg;
	return 0;
}

/* The bridge is off in this harness (as with plugin_opt_bridge false). */
int akz_bridge_device_status(struct akz_bridge *b, const char *id, struct akz_status_dev *out)
{
	(void)b; (void)id; (void)out;
	return -1;
}

int akz_bridge_reconnect(struct akz_bridge *b, const char *id)
{
	(void)b; (void)id;
	return -1;
}

void akz_bridge_summary(struct akz_bridge *b, struct akz_status_summary *out)
{
	(void)b;
	memset(out, 0, sizeof(*out));
}

/* ---- the target --------------------------------------------------------------------------- */

static char dir[64];
static char keys[128];
static char regpath[128];
static char seed[1024];
static struct akz_plugin plugin;

static void cleanup(void)
{
	akz_registry_free(plugin.reg);
	akz_config_free(&plugin.cfg);
	fuzz_clear_dir(keys, 1);
	fuzz_clear_dir(dir, 1);
}

static void report(void *ctx, const char *problem)
{
	(void)ctx;
	(void)problem;
}

/* Puts the seed registry back (file and keys) and loads it. Aborts if that fails: the harness,
 * not the input, would be broken. */
static void reset(void)
{
	fuzz_clear_dir(keys, 0);
	char priv[192], err[256];
	snprintf(priv, sizeof(priv), "%s/dev1.pem", keys);
	static struct akz_key *key;
	if(key == NULL && akz_key_generate(AKZ_ALG_ES256, 0, &key, err, sizeof(err)) != 0) abort();
	if(akz_key_write(key, priv, NULL, err, sizeof(err)) != 0) abort();
	if(fuzz_write_file(regpath, seed, strlen(seed)) != 0) abort();
	akz_registry_free(plugin.reg);
	plugin.reg = NULL;
	struct akz_key_opts ko = {0};
	if(akz_registry_load(regpath, keys, &ko, report, NULL, &plugin.reg) != 0) abort();
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	snprintf(dir, sizeof(dir), "/tmp/akz-fuzz-control-XXXXXX");
	if(mkdtemp(dir) == NULL) abort();
	snprintf(keys, sizeof(keys), "%s/keys", dir);
	snprintf(regpath, sizeof(regpath), "%s/devices.json", dir);
	if(mkdir(keys, 0700) != 0) abort();
	/* A $7$ hash of "pw" as mosquitto_passwd writes it (101 iterations: cheap to check). */
	snprintf(seed, sizeof(seed), "{\"devices\":[{\"id\":\"dev1\",\"password\":"
			"\"$7$101$4BQA6+1/ZNRH0if6$8LcPsuStAZ7BTaZIONTT2RbG0htEGp05F0Ub9JvzwZEWgbCQbBJh8m5VVvxdP3XB066Ejc6bhFxTGSxAVurP1w==\"}],"
			"\"gateways\":[{\"username\":\"gw\",\"password\":"
			"\"$7$101$4BQA6+1/ZNRH0if6$8LcPsuStAZ7BTaZIONTT2RbG0htEGp05F0Ub9JvzwZEWgbCQbBJh8m5VVvxdP3XB066Ejc6bhFxTGSxAVurP1w==\","
			"\"devices\":[\"dev1\"]}]}");
	plugin.cfg.devices_path = strdup(regpath);
	plugin.cfg.keystore_dir = strdup(keys);
	if(plugin.cfg.devices_path == NULL || plugin.cfg.keystore_dir == NULL) abort();
	reset();
	atexit(cleanup);
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct mosquitto_evt_control ev;
	memset(&ev, 0, sizeof(ev));
	ev.topic = AKZ_CONTROL_TOPIC;
	ev.payload = size ? (const void *)data : NULL;
	ev.payloadlen = (uint32_t)size;
	if(akz_control_callback(MOSQ_EVT_CONTROL, &ev, &plugin) != MOSQ_ERR_SUCCESS) abort();
	reset();
	return 0;
}
