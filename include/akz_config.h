/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_config.h - the plugin's options (plugin_opt_* in mosquitto.conf), parsed and checked. */
#ifndef AKZ_CONFIG_H
#define AKZ_CONFIG_H

#include <stdbool.h>
#include <stddef.h>

struct akz_config {
	/* edge side */
	char *devices_path;          /* plugin_opt_devices (required) */
	char *keystore_dir;          /* plugin_opt_keystore (default: keys/ beside the registry) */
	char *key_passphrase_file;   /* plugin_opt_key_passphrase_file */
	bool allow_readable_keys;    /* plugin_opt_allow_readable_keys */
	int auth_cache_seconds;      /* plugin_opt_auth_cache_seconds (default 300, 0 = off) */
	bool auth_thread;            /* plugin_opt_auth_thread: 2.1's delayed logins for registry users (default false) */
	char *providers;             /* plugin_opt_providers: OpenSSL providers for keys in a device ("default,tpm2") */
	char *openssl_conf;          /* plugin_opt_openssl_conf: OpenSSL configuration file for them */
	int key_timeout;             /* plugin_opt_key_timeout: seconds to wait for a key's device (default 30) */
	/* upstream */
	bool bridge_enabled;         /* plugin_opt_bridge (default true) */
	char *upstream_host;         /* plugin_opt_upstream_host (default mqtt.akenza.io) */
	int upstream_port;           /* plugin_opt_upstream_port (default 8883) */
	char *upstream_cafile;       /* plugin_opt_upstream_cafile (default: system CA bundle) */
	char *upstream_capath;       /* plugin_opt_upstream_capath */
	char *audience;              /* plugin_opt_audience: tokens' "aud" is https://<audience>/devices/<id>
	                                (default akenza.io; a private cloud's host, e.g. <customer>.akenza.io) */
	char *upstream_username;     /* plugin_opt_upstream_username (default "unused") */
	char *upstream_tls_version;  /* plugin_opt_upstream_tls_version: tlsv1.2 (default) or tlsv1.3 */
	int upstream_keepalive;      /* plugin_opt_upstream_keepalive (default 60 s) */
	int upstream_dns_refresh;    /* plugin_opt_upstream_dns_refresh: seconds between lookups of upstream_host (default 60) */
	long token_lifetime;         /* plugin_opt_token_lifetime (default 1200 s) */
	int connect_rate;            /* plugin_opt_connect_rate: connection attempts per second (default 200) */
	int connect_concurrency;     /* plugin_opt_connect_concurrency: connections awaiting CONNACK at once (default 64) */
	int queue_max;               /* plugin_opt_queue_max: uplinks held per device (default 0 = auto:
	                                1000 in memory, bounded by spool_device_max_bytes with a spool) */
	long uplink_ttl;             /* plugin_opt_spool_ttl: seconds an uplink may wait (default 7200, 0 = forever) */
	/* durable spool (off unless spool_dir is set) */
	char *spool_dir;             /* plugin_opt_spool_dir */
	char *spool_sync;            /* plugin_opt_spool_sync: always, batch (default) or none */
	int spool_sync_ms;           /* plugin_opt_spool_sync_ms: batch bound (default 5) */
	long spool_max_bytes;        /* plugin_opt_spool_max_bytes (default 64 MiB) */
	long spool_device_max_bytes; /* plugin_opt_spool_device_max_bytes (default 16 MiB) */
	long spool_segment_bytes;    /* plugin_opt_spool_segment_bytes (default 4 MiB) */
	bool spool_qos0;             /* plugin_opt_spool_qos0: spool QoS 0 uplinks too (default false) */
	bool receipts;               /* plugin_opt_receipts: publish delivery receipts (default false) */
	char *receipts_prefix;       /* plugin_opt_receipts_topic: prefix, the device id follows (default akenza/receipts/) */
	char *downlink_wakeup;       /* plugin_opt_downlink_wakeup: signal (default) or tick */
	int status_interval_ms;      /* plugin_opt_status_interval: min ms between status publishes (default 1000) */
	int light_pause_ms;          /* plugin_opt_light_pause_ms: the bridge thread's pause after a light turn (default 5) */
};

struct mosquitto_opt;

/* Fills cfg from the broker's option list, applying defaults. Unknown options and malformed
 * values are errors. Returns 0, or -1 after calling report(ctx, msg) once for every problem
 * (msg names the option and the reason). cfg is freed on failure. Options of earlier versions
 * that no longer do anything are not errors: notice(ctx, msg) names each (notice may be NULL). */
int akz_config_parse(struct akz_config *cfg, const struct mosquitto_opt *opts, int count,
		void (*report)(void *ctx, const char *msg), void (*notice)(void *ctx, const char *msg), void *ctx);

/* Frees what cfg owns and zeroes it. */
void akz_config_free(struct akz_config *cfg);

#endif
