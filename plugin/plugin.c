/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* plugin.c - mosquitto_akenza entry points: options, callback wiring, reload. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/crypto.h>
#include "akz_mosquitto.h"
#include "akz_auth.h"
#include "akz_bridge.h"
#include "akz_compat.h"
#include "akz_control.h"
#include "akz_keythread.h"
#include "akz_plugin.h"
#include "akz_registry.h"
#include "akz_topic.h"
#include "akz_util.h"
#include "akz_wakeup.h"

#define AKZ_EXPORT __attribute__((visibility("default")))

/* Mosquitto 2.1 built without websockets sleeps until its next event: the plugin wakes it when
 * no TICK has run for this long (akz_wakeup_set_heartbeat). Longer than the 100 ms that 2.0 and
 * 2.1 with websockets sleep at most, so that it never fires where the loop turns on its own. */
#define TICK_HEARTBEAT_MS 150

static void log_problem(void *ctx, const char *msg)
{
	(void)ctx;
	mosquitto_log_printf(MOSQ_LOG_ERR, "akenza: %s", akz_esc(msg));
}

static void log_warning(void *ctx, const char *msg)
{
	(void)ctx;
	mosquitto_log_printf(MOSQ_LOG_WARNING, "akenza: %s", akz_esc(msg));
}

static struct akz_key_opts key_opts(const struct akz_config *cfg)
{
	struct akz_key_opts o = {
		.passphrase_file = cfg->key_passphrase_file,
		.allow_group_readable = cfg->allow_readable_keys,
	};
	return o;
}

/* Sets up the OpenSSL providers for keys held in a device (a TPM), loaded by the key thread
 * when first needed: a TPM absent at start fails its devices' tokens, not the start. Returns 0,
 * or -1 after logging why. */
static int configure_key_providers(const struct akz_config *cfg)
{
	char err[512];
	akz_keythread_set_timeout(cfg->key_timeout * 1000);
	if(akz_keythread_configure(cfg->providers, cfg->openssl_conf, err, sizeof(err))){
		mosquitto_log_printf(MOSQ_LOG_ERR, "akenza: refusing to start: plugin_opt_providers / "
				"plugin_opt_openssl_conf: %s", err);
		return -1;
	}
	if(cfg->providers || cfg->openssl_conf){
		mosquitto_log_printf(MOSQ_LOG_INFO, "akenza: keys in a device through OpenSSL providers %s%s%s",
				cfg->providers ? cfg->providers : "", cfg->openssl_conf ? " from " : "",
				cfg->openssl_conf ? cfg->openssl_conf : "");
	}
	return 0;
}

/* Loads the registry named in cfg, taking unchanged keys over from prev (NULL at start).
 * Returns it, or NULL after logging every problem. */
static struct akz_registry *load_registry(const struct akz_config *cfg, const struct akz_registry *prev)
{
	struct akz_key_opts ko = key_opts(cfg);
	struct akz_registry *reg = NULL;

	if(akz_registry_reload(cfg->devices_path, cfg->keystore_dir, &ko, prev, log_problem, NULL, &reg)){
		return NULL;
	}
	akz_registry_weak_hashes(reg, cfg->devices_path, log_warning, NULL);
	return reg;
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct akz_plugin *p = userdata;
	(void)event;
	akz_bridge_check_tick(p->bridge);
	return akz_auth_basic(p->auth, p->reg, &p->cfg, event_data);
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct akz_plugin *p = userdata;
	(void)event;
	return akz_acl_check(p->reg, p->cfg.receipts ? p->cfg.receipts_prefix : NULL, event_data);
}

/* Uplinks: runs before the broker stores the message and acknowledges it, so a refusal here
 * keeps a QoS 1 publisher's message on the publisher's side. */
static int on_message(int event, void *event_data, void *userdata)
{
	struct akz_plugin *p = userdata;
	struct mosquitto_evt_message *ev = event_data;
	size_t idlen;
	(void)event;

	if(p->bridge == NULL) return MOSQ_ERR_SUCCESS;
	akz_bridge_check_tick(p->bridge);
	const char *id = akz_topic_device(ev->topic, AKZ_TOPIC_UP, &idlen);
	if(id == NULL) return MOSQ_ERR_SUCCESS;

	void *corr = NULL;
	uint16_t corrlen = 0;
	const char *why = NULL;
	if(ev->properties){
		/* Read, not removed: the local subscribers see the message as the device sent it. */
		mosquitto_property_read_binary(ev->properties, MQTT_PROP_CORRELATION_DATA, &corr, &corrlen, false);
	}
	enum akz_uplink_result r = akz_bridge_uplink(p->bridge, id, idlen, ev->topic, ev->payload,
			ev->payloadlen, ev->qos, corr, corrlen);
	free(corr);
	switch(r){
	case AKZ_UPLINK_QUEUED:
	case AKZ_UPLINK_UNKNOWN:
		return MOSQ_ERR_SUCCESS;
	case AKZ_UPLINK_FULL: why = "its uplink queue is full (plugin_opt_queue_max)"; break;
	case AKZ_UPLINK_SPOOL_FULL: why = "its share of the spool, or the spool, is full "
			"(plugin_opt_spool_device_max_bytes, plugin_opt_spool_max_bytes)"; break;
	case AKZ_UPLINK_SPOOL_IO: why = "the spool cannot write (disk full or I/O error, see above)"; break;
	case AKZ_UPLINK_NOMEM: why = "out of memory"; break;
	}
	/* Full: an MQTT v5 client gets a failure reason code in its PUBACK and knows the message
	 * was not taken; a 3.1.1 client is disconnected without a PUBACK and sends the message again
	 * when it reconnects (akz_refuse_publish, docs/DESIGN.md). */
	const char *cid = mosquitto_client_id(ev->client);
	char idbuf[256];
	snprintf(idbuf, sizeof(idbuf), "%.*s", (int)idlen, id);
	mosquitto_log_printf(MOSQ_LOG_WARNING,
			"akenza: device '%s': refusing uplink from client '%s': %s; the client keeps it",
			akz_esc(idbuf), akz_esc(cid ? cid : "?"), why);
	return akz_refuse_publish(ev);
}

static int on_tick(int event, void *event_data, void *userdata)
{
	struct akz_plugin *p = userdata;
	(void)event;
	akz_auth_tick(p->auth, p->reg, &p->cfg);   /* Mosquitto 2.1: logins whose checks finished */
	if(p->bridge) akz_bridge_tick(p->bridge);
	akz_tick_every_turn(event_data);
	return MOSQ_ERR_SUCCESS;
}

/* Kicks local clients of devices that the new registry removed or disabled. */
static void kick_removed(const struct akz_registry *old, const struct akz_registry *new)
{
	size_t n = akz_registry_device_count(old);
	for(size_t i = 0; i < n; i++){
		const struct akz_device *d = akz_registry_device_at(old, i);
		const struct akz_device *nd = akz_registry_find_device_by_username(new, d->username);
		if(nd == NULL || !nd->enabled || strcmp(nd->password, d->password) != 0){
			mosquitto_log_printf(MOSQ_LOG_NOTICE,
					"akenza: device '%s' removed, disabled or its password changed: disconnecting user '%s'",
					akz_esc(d->id), akz_esc(d->username));
			mosquitto_kick_client_by_username(d->username, false);
		}
	}
	n = akz_registry_gateway_count(old);
	for(size_t i = 0; i < n; i++){
		const struct akz_gateway *g = akz_registry_gateway_at(old, i);
		const struct akz_gateway *ng = akz_registry_find_gateway(new, g->username);
		if(ng == NULL || strcmp(ng->password, g->password) != 0){
			mosquitto_log_printf(MOSQ_LOG_NOTICE,
					"akenza: gateway '%s' removed or its password changed: disconnecting it",
					akz_esc(g->username));
			mosquitto_kick_client_by_username(g->username, false);
		}
	}
}

int akz_plugin_apply_registry(struct akz_plugin *p, struct akz_registry *reg)
{
	if(p->bridge && akz_bridge_sync(p->bridge, reg)){
		akz_registry_free(reg);
		return -1;
	}
	struct akz_registry *old = p->reg;
	p->reg = reg;
	akz_auth_sync(p->auth, reg);
	kick_removed(old, reg);
	akz_registry_free(old);
	return 0;
}

/* SIGHUP: a registry that fails to load leaves the one in force untouched. */
static int on_reload(int event, void *event_data, void *userdata)
{
	struct akz_plugin *p = userdata;
	(void)event;
	(void)event_data;

	akz_auth_reloading(p->auth);
	struct akz_registry *reg = load_registry(&p->cfg, p->reg);
	if(reg == NULL){
		mosquitto_log_printf(MOSQ_LOG_ERR,
				"akenza: reload of %s failed: keeping the previous registry (%zu devices) in force",
				akz_esc(p->cfg.devices_path), akz_registry_device_count(p->reg));
		return MOSQ_ERR_SUCCESS;
	}
	size_t ndev = akz_registry_device_count(reg), ngw = akz_registry_gateway_count(reg);
	if(akz_plugin_apply_registry(p, reg)){
		mosquitto_log_printf(MOSQ_LOG_ERR,
				"akenza: reload of %s: out of memory updating the bridge: keeping the previous registry",
				akz_esc(p->cfg.devices_path));
		return MOSQ_ERR_SUCCESS;
	}
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "akenza: reloaded %s: %zu devices, %zu gateways",
			akz_esc(p->cfg.devices_path), ndev, ngw);
	return MOSQ_ERR_SUCCESS;
}

static const struct {
	MOSQ_FUNC_generic_callback cb;
	int event;
	bool needs_bridge;
} callbacks[] = {
	{on_basic_auth, MOSQ_EVT_BASIC_AUTH, false},
	{on_acl_check, MOSQ_EVT_ACL_CHECK, false},
	{on_reload, MOSQ_EVT_RELOAD, false},
	{on_message, AKZ_EVT_MESSAGE_IN, true},
	{on_tick, MOSQ_EVT_TICK, true},
};
#define NCALLBACKS (sizeof(callbacks)/sizeof(callbacks[0]))

/* Whether callbacks[i] is registered: the bridge's only with a bridge, the TICK also when logins
 * are answered from it (Mosquitto 2.1). */
static bool wanted(const struct akz_plugin *p, size_t i)
{
	if(!callbacks[i].needs_bridge || p->bridge) return true;
	return callbacks[i].event == MOSQ_EVT_TICK && p->auth && akz_auth_offloads(p->auth);
}

static void destroy(struct akz_plugin *p)
{
	if(p == NULL) return;
	if(p->control_registered){
		mosquitto_callback_unregister(p->id, MOSQ_EVT_CONTROL, akz_control_callback, AKZ_CONTROL_TOPIC);
	}
	for(size_t i = 0; i < NCALLBACKS; i++){
		if(wanted(p, i)) mosquitto_callback_unregister(p->id, callbacks[i].event, callbacks[i].cb, NULL);
	}
	akz_bridge_stop(p->bridge);
	akz_registry_free(p->reg);
	akz_auth_free(p->auth);
	akz_config_free(&p->cfg);
	free(p);
	akz_keystore_cleanup();
	akz_keythread_cleanup();
}

AKZ_EXPORT int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

AKZ_EXPORT int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
		struct mosquitto_opt *options, int option_count)
{
	struct akz_plugin *p = calloc(1, sizeof(*p));
	if(p == NULL) return MOSQ_ERR_NOMEM;
	p->id = identifier;

	akz_compat_init(identifier, "mosquitto_akenza", AKZ_VERSION);
	if(akz_broker_is_21()) akz_wakeup_set_heartbeat(TICK_HEARTBEAT_MS);
	mosquitto_log_printf(MOSQ_LOG_INFO, "akenza: mosquitto_akenza %s (broker API %s, libmosquitto %d, %s)",
			AKZ_VERSION, akz_broker_is_21() ? "2.1" : "2.0", mosquitto_lib_version(NULL, NULL, NULL),
			OpenSSL_version(OPENSSL_VERSION));
	if(akz_config_parse(&p->cfg, options, option_count, log_problem, log_warning, NULL)){
		mosquitto_log_printf(MOSQ_LOG_ERR, "akenza: refusing to start: fix the plugin_opt_ lines above");
		free(p);
		return MOSQ_ERR_INVAL;
	}
	p->auth = akz_auth_new(p->cfg.auth_thread);
	if(p->auth == NULL) goto nomem;
	if(configure_key_providers(&p->cfg)){
		destroy(p);
		return MOSQ_ERR_INVAL;
	}
	p->reg = load_registry(&p->cfg, NULL);
	if(p->reg == NULL){
		mosquitto_log_printf(MOSQ_LOG_ERR, "akenza: refusing to start: registry %s has the problems above",
				akz_esc(p->cfg.devices_path));
		destroy(p);
		return MOSQ_ERR_INVAL;
	}
	akz_auth_sync(p->auth, p->reg);
	if(p->cfg.bridge_enabled){
		char err[256];
		if(akz_bridge_start(&p->cfg, &p->bridge, err, sizeof(err))){
			mosquitto_log_printf(MOSQ_LOG_ERR, "akenza: refusing to start: bridge: %s", akz_esc(err));
			destroy(p);
			return MOSQ_ERR_INVAL;
		}
		if(akz_bridge_sync(p->bridge, p->reg)) goto nomem;
	}
	for(size_t i = 0; i < NCALLBACKS; i++){
		if(!wanted(p, i)) continue;
		int rc = mosquitto_callback_register(identifier, callbacks[i].event, callbacks[i].cb, NULL, p);
		if(rc){
			mosquitto_log_printf(MOSQ_LOG_ERR, "akenza: cannot register callback %d: %s",
					callbacks[i].event, mosquitto_strerror(rc));
			destroy(p);
			return rc;
		}
	}
	/* The control API: the broker's ACL on $CONTROL/akenza/# decides who may use it. A second
	 * instance in the same security scope finds the topic taken and goes without. */
	int crc = mosquitto_callback_register(identifier, MOSQ_EVT_CONTROL, akz_control_callback,
			AKZ_CONTROL_TOPIC, p);
	if(crc == MOSQ_ERR_SUCCESS){
		p->control_registered = true;
	}else{
		mosquitto_log_printf(MOSQ_LOG_WARNING, "akenza: no control API on %s for this instance: %s",
				AKZ_CONTROL_TOPIC, mosquitto_strerror(crc));
	}
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "akenza: %zu devices, %zu gateways from %s; bridge %s",
			akz_registry_device_count(p->reg), akz_registry_gateway_count(p->reg),
			akz_esc(p->cfg.devices_path), p->bridge ? "on" : "off");
	*userdata = p;
	return MOSQ_ERR_SUCCESS;

nomem:
	mosquitto_log_printf(MOSQ_LOG_ERR, "akenza: out of memory at start");
	destroy(p);
	return MOSQ_ERR_NOMEM;
}

AKZ_EXPORT int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	(void)options;
	(void)option_count;
	destroy(userdata);
	return MOSQ_ERR_SUCCESS;
}
