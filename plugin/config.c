/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* config.c - parsing and checking plugin_opt_* options. */
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "akz_mosquitto.h"
#include "akz_config.h"
#include "akz_jwt.h"
#include "akz_spool.h"

typedef void (*report_fn)(void *ctx, const char *msg);

enum opt_kind { OPT_STRING, OPT_INT, OPT_LONG, OPT_BOOL };

/* One table row per option, so that parsing, defaults and checks cannot drift apart. */
struct opt_spec {
	const char *name;
	enum opt_kind kind;
	size_t offset;
	const char *def;    /* default as text, NULL for none */
	long min, max;      /* range for numbers */
};

#define OFF(f) offsetof(struct akz_config, f)
static const struct opt_spec specs[] = {
	{"devices", OPT_STRING, OFF(devices_path), NULL, 0, 0},
	{"keystore", OPT_STRING, OFF(keystore_dir), NULL, 0, 0},
	{"key_passphrase_file", OPT_STRING, OFF(key_passphrase_file), NULL, 0, 0},
	{"allow_readable_keys", OPT_BOOL, OFF(allow_readable_keys), "false", 0, 0},
	{"auth_cache_seconds", OPT_INT, OFF(auth_cache_seconds), "300", 0, 86400},
	{"auth_thread", OPT_BOOL, OFF(auth_thread), "false", 0, 0},
	{"providers", OPT_STRING, OFF(providers), NULL, 0, 0},
	{"openssl_conf", OPT_STRING, OFF(openssl_conf), NULL, 0, 0},
	{"key_timeout", OPT_INT, OFF(key_timeout), "30", 1, 600},
	{"bridge", OPT_BOOL, OFF(bridge_enabled), "true", 0, 0},
	{"upstream_host", OPT_STRING, OFF(upstream_host), "mqtt.akenza.io", 0, 0},
	{"upstream_port", OPT_INT, OFF(upstream_port), "8883", 1, 65535},
	{"upstream_cafile", OPT_STRING, OFF(upstream_cafile), NULL, 0, 0},
	{"upstream_capath", OPT_STRING, OFF(upstream_capath), NULL, 0, 0},
	{"audience", OPT_STRING, OFF(audience), AKZ_AUDIENCE_DEFAULT, 0, 0},
	{"upstream_username", OPT_STRING, OFF(upstream_username), "unused", 0, 0},
	{"upstream_tls_version", OPT_STRING, OFF(upstream_tls_version), "tlsv1.2", 0, 0},
	{"upstream_keepalive", OPT_INT, OFF(upstream_keepalive), "60", 5, 65535},
	{"upstream_dns_refresh", OPT_INT, OFF(upstream_dns_refresh), "60", 1, 86400},
	{"token_lifetime", OPT_LONG, OFF(token_lifetime), "1200", AKZ_JWT_LIFETIME_MIN, AKZ_JWT_LIFETIME_MAX},
	{"connect_rate", OPT_INT, OFF(connect_rate), "200", 1, 100000},
	{"connect_concurrency", OPT_INT, OFF(connect_concurrency), "64", 1, 100000},
	{"queue_max", OPT_INT, OFF(queue_max), "0", 0, 100000000},
	{"spool_ttl", OPT_LONG, OFF(uplink_ttl), "7200", 0, 31536000},
	{"spool_dir", OPT_STRING, OFF(spool_dir), NULL, 0, 0},
	{"spool_sync", OPT_STRING, OFF(spool_sync), "batch", 0, 0},
	{"spool_sync_ms", OPT_INT, OFF(spool_sync_ms), "5", 1, 1000},
	{"spool_max_bytes", OPT_LONG, OFF(spool_max_bytes), "67108864", 65536, 1L << 40},
	{"spool_device_max_bytes", OPT_LONG, OFF(spool_device_max_bytes), "16777216", 4096, 1L << 40},
	{"spool_segment_bytes", OPT_LONG, OFF(spool_segment_bytes), "4194304", 4096, 1L << 30},
	{"spool_qos0", OPT_BOOL, OFF(spool_qos0), "false", 0, 0},
	{"receipts", OPT_BOOL, OFF(receipts), "false", 0, 0},
	{"receipts_topic", OPT_STRING, OFF(receipts_prefix), "akenza/receipts/", 0, 0},
	{"downlink_wakeup", OPT_STRING, OFF(downlink_wakeup), "signal", 0, 0},
	{"status_interval", OPT_INT, OFF(status_interval_ms), "1000", 0, 3600000},
	{"light_pause_ms", OPT_INT, OFF(light_pause_ms), "5", 0, 100},
};
#undef OFF

static void reportf(report_fn report, void *ctx, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void reportf(report_fn report, void *ctx, const char *fmt, ...)
{
	char msg[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if(report) report(ctx, msg);
}

/* Options of earlier versions that no longer do anything: a configuration that still sets them
 * starts, with a line saying so (a gateway that upgrades must not stay down for a tuning knob). */
static const char *const retired[] = {
	"uplink_direct", "uplink_coalesce_us", "uplink_coalesce_rate",
};

static bool is_retired(const char *name)
{
	for(size_t i = 0; i < sizeof(retired)/sizeof(retired[0]); i++){
		if(strcmp(retired[i], name) == 0) return true;
	}
	return false;
}

static const struct opt_spec *find_spec(const char *name)
{
	for(size_t i = 0; i < sizeof(specs)/sizeof(specs[0]); i++){
		if(strcmp(specs[i].name, name) == 0) return &specs[i];
	}
	return NULL;
}

/* Stores `value` into the field spec names. Returns 0, or -1 after reporting why. */
static int set_option(struct akz_config *cfg, const struct opt_spec *spec, const char *value,
		report_fn report, void *ctx)
{
	char *field = (char *)cfg + spec->offset;

	switch(spec->kind){
	case OPT_STRING: {
		if(value[0] == '\0'){
			reportf(report, ctx, "plugin_opt_%s: empty value", spec->name);
			return -1;
		}
		char *copy = strdup(value);
		if(copy == NULL){
			reportf(report, ctx, "plugin_opt_%s: out of memory", spec->name);
			return -1;
		}
		free(*(char **)field);
		*(char **)field = copy;
		return 0;
	}
	case OPT_BOOL:
		if(!strcmp(value, "true") || !strcmp(value, "yes") || !strcmp(value, "1")){
			*(bool *)field = true;
		}else if(!strcmp(value, "false") || !strcmp(value, "no") || !strcmp(value, "0")){
			*(bool *)field = false;
		}else{
			reportf(report, ctx, "plugin_opt_%s: '%s' is not true or false", spec->name, value);
			return -1;
		}
		return 0;
	case OPT_INT:
	case OPT_LONG: {
		char *end;
		errno = 0;
		long v = strtol(value, &end, 10);
		if(errno || end == value || *end != '\0'){
			reportf(report, ctx, "plugin_opt_%s: '%s' is not a whole number", spec->name, value);
			return -1;
		}
		if(v < spec->min || v > spec->max){
			reportf(report, ctx, "plugin_opt_%s: %ld is outside %ld..%ld", spec->name, v,
					spec->min, spec->max);
			return -1;
		}
		if(spec->kind == OPT_INT) *(int *)field = (int)v;
		else *(long *)field = v;
		return 0;
	}
	}
	return -1;
}

void akz_config_free(struct akz_config *cfg)
{
	for(size_t i = 0; i < sizeof(specs)/sizeof(specs[0]); i++){
		if(specs[i].kind == OPT_STRING){
			char **p = (char **)((char *)cfg + specs[i].offset);
			free(*p);
		}
	}
	memset(cfg, 0, sizeof(*cfg));
}

int akz_config_parse(struct akz_config *cfg, const struct mosquitto_opt *opts, int count,
		report_fn report, report_fn notice, void *ctx)
{
	int bad = 0;

	memset(cfg, 0, sizeof(*cfg));
	for(size_t i = 0; i < sizeof(specs)/sizeof(specs[0]); i++){
		if(specs[i].def && set_option(cfg, &specs[i], specs[i].def, report, ctx)) bad++;
	}
	for(int i = 0; i < count; i++){
		const struct opt_spec *spec = find_spec(opts[i].key);
		if(spec == NULL && is_retired(opts[i].key)){
			reportf(notice, ctx, "plugin_opt_%s: no longer used, ignored: remove the line", opts[i].key);
			continue;
		}
		if(spec == NULL){
			reportf(report, ctx, "plugin_opt_%s: unknown option", opts[i].key);
			bad++;
			continue;
		}
		if(opts[i].value == NULL || set_option(cfg, spec, opts[i].value, report, ctx)){
			if(opts[i].value == NULL) reportf(report, ctx, "plugin_opt_%s: no value", opts[i].key);
			bad++;
		}
	}
	if(cfg->devices_path == NULL){
		reportf(report, ctx, "plugin_opt_devices: required (path of the device registry, devices.json)");
		bad++;
	}
	if(cfg->downlink_wakeup && strcmp(cfg->downlink_wakeup, "signal") != 0
			&& strcmp(cfg->downlink_wakeup, "tick") != 0){
		reportf(report, ctx, "plugin_opt_downlink_wakeup: '%s' is not signal or tick", cfg->downlink_wakeup);
		bad++;
	}
	if(cfg->upstream_tls_version && strcmp(cfg->upstream_tls_version, "tlsv1.2") != 0
			&& strcmp(cfg->upstream_tls_version, "tlsv1.3") != 0){
		reportf(report, ctx, "plugin_opt_upstream_tls_version: '%s' is not tlsv1.2 or tlsv1.3",
				cfg->upstream_tls_version);
		bad++;
	}
	const char *why = cfg->audience ? akz_jwt_bad_audience(cfg->audience) : NULL;
	if(why){
		reportf(report, ctx, "plugin_opt_audience: '%.64s' %s", cfg->audience, why);
		bad++;
	}
	enum akz_spool_sync sync;
	if(cfg->spool_sync && akz_spool_sync_parse(cfg->spool_sync, &sync)){
		reportf(report, ctx, "plugin_opt_spool_sync: '%s' is not always, batch or none", cfg->spool_sync);
		bad++;
	}
	/* Receipt topics are built in a 512-byte buffer (bridge_loop.c): a prefix longer than 256 bytes
	 * could cut the device id short there, and a cut id can name another device's topic. */
	if(cfg->receipts_prefix && strlen(cfg->receipts_prefix) > 256){
		reportf(report, ctx, "plugin_opt_receipts_topic: longer than 256 bytes");
		bad++;
	}else if(cfg->receipts_prefix && (strpbrk(cfg->receipts_prefix, "+#") || cfg->receipts_prefix[0] == '$')){
		reportf(report, ctx, "plugin_opt_receipts_topic: '%s': a topic prefix may not contain + or # "
				"nor start with $", cfg->receipts_prefix);
		bad++;
	}
	if(bad){
		akz_config_free(cfg);
		return -1;
	}
	return 0;
}
