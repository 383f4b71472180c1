/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_registry.h - the device registry (devices.json): devices, gateways, their keys. */
#ifndef AKZ_REGISTRY_H
#define AKZ_REGISTRY_H

#include <stdbool.h>
#include <stddef.h>
#include "akz_keystore.h"

/* One akenza device as the registry describes it. Owned by its registry. */
struct akz_device {
	char *id;            /* akenza deviceId: the upstream client id */
	char *username;      /* local username (defaults to id) */
	char *password;      /* password hash ($6$ or $7$), never plain text */
	char *key_uri;       /* path or OSSL_STORE URI of the private key */
	bool enabled;
	struct akz_key *key; /* loaded key (one reference held by the registry) */
	char *next_key_uri;  /* "next_key": a pending key made by rotateKey, or NULL */
	struct akz_key *next_key; /* loaded pending key, or NULL */
};

/* A local program that publishes for several devices. Owned by its registry. */
struct akz_gateway {
	char *username;
	char *password;      /* password hash */
	char **devices;      /* device ids it may speak for */
	size_t ndevices;
	bool all_devices;    /* "devices": ["*"] */
};

struct akz_registry;

/* Receives one problem found while loading, already formatted with the file and the field,
 * e.g. "devices.json: devices[3].id: duplicate id 'abc' (first at devices[0])". */
typedef void (*akz_report_fn)(void *ctx, const char *problem);

/* Reads and checks the registry at `path` and loads every key it names (keys default to
 * <keystore_dir>/<id>.pem; keystore_dir NULL means "keys/" beside the registry).
 * Every problem is passed to report (which may be NULL), not only the first.
 * Returns 0 and *out on success; -1 if there was any problem, with *out NULL. */
int akz_registry_load(const char *path, const char *keystore_dir, const struct akz_key_opts *kopts,
		akz_report_fn report, void *report_ctx, struct akz_registry **out);

/* As akz_registry_load, but a key file that is unchanged since prev (may be NULL) loaded it, for
 * the same device, is taken over from prev instead of being parsed again (same path, inode, size,
 * owner, mode, mtime and ctime). prev stays the caller's. Keys are immutable and reference
 * counted, so both registries may hold one. */
int akz_registry_reload(const char *path, const char *keystore_dir, const struct akz_key_opts *kopts,
		const struct akz_registry *prev, akz_report_fn report, void *report_ctx, struct akz_registry **out);

/* Frees the registry and drops its key references. NULL is ignored. */
void akz_registry_free(struct akz_registry *reg);

size_t akz_registry_device_count(const struct akz_registry *reg);
const struct akz_device *akz_registry_device_at(const struct akz_registry *reg, size_t i);
size_t akz_registry_gateway_count(const struct akz_registry *reg);
const struct akz_gateway *akz_registry_gateway_at(const struct akz_registry *reg, size_t i);

/* Lookups in O(1) average. NULL when absent. */
const struct akz_device *akz_registry_find_device(const struct akz_registry *reg, const char *id);
const struct akz_device *akz_registry_find_device_by_username(const struct akz_registry *reg,
		const char *username);
const struct akz_gateway *akz_registry_find_gateway(const struct akz_registry *reg,
		const char *username);

/* Why `id` cannot be a device id (an akenza deviceId, an MQTT topic level and a file name in
 * the key store): empty, longer than 128 bytes, "*" (a gateway's word for every device), '/', '+'
 * or '#', or what akz_text_bad_reason refuses. As a phrase such as "is empty"; NULL if it is fine.
 * Never fails. */
const char *akz_registry_bad_id_reason(const char *id);

/* Why `u` cannot be a local username of a device or gateway (empty, longer than 256 bytes, not
 * UTF-8, control characters: MQTT's own rules), as a phrase; NULL if it is fine. Never fails. */
const char *akz_registry_bad_username_reason(const char *u);

/* The path of a file in the key store of the registry at registry_path (keystore_dir as in
 * akz_registry_load): <keystore>/<id><suffix>, e.g. suffix ".pem" gives a device's default key.
 * Returns a new string (caller frees), or NULL when out of memory or too long. */
char *akz_registry_keystore_path(const char *registry_path, const char *keystore_dir,
		const char *id, const char *suffix);

/* Where a device's "key" value (a path relative to the registry's directory, an absolute path
 * or an OSSL_STORE URI) points to, as akz_registry_load resolves it. Returns a new string
 * (caller frees), or NULL when out of memory. */
char *akz_registry_resolve_key(const char *registry_path, const char *key);

/* Reports, in one line through report (naming path), the users of reg whose password hash is
 * weak: $6$ (one SHA-512), or $7$ with fewer than AKZ_PW_ITERATIONS_WEAK iterations. Such hashes
 * load (mosquitto_passwd 2.0 writes $7$ with 101 iterations) but are cheap to guess from a copy
 * of the registry. Reports nothing when there are none. Never fails. */
void akz_registry_weak_hashes(const struct akz_registry *reg, const char *path, akz_report_fn report, void *ctx);

/* True if the gateway may speak for device `id`. */
bool akz_gateway_serves(const struct akz_gateway *gw, const char *id);

#endif
