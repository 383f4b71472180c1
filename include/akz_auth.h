/* akz_auth.h - local authentication (BASIC_AUTH) and per-device ACLs (ACL_CHECK). */
#ifndef AKZ_AUTH_H
#define AKZ_AUTH_H

#include <stdbool.h>
#include <time.h>

struct akz_registry;
struct akz_config;
struct mosquitto_evt_basic_auth;
struct mosquitto_evt_acl_check;

/* State of local authentication: the cache of recent successful checks and the per-username
 * failure counters used to slow brute force down. Broker thread only. */
struct akz_auth;

/* Returns a new state, or NULL when out of memory. */
struct akz_auth *akz_auth_new(void);
void akz_auth_free(struct akz_auth *auth);

/* Forgets every cached success (after a reload or a password change). */
void akz_auth_invalidate(struct akz_auth *auth);

/* The BASIC_AUTH decision: MOSQ_ERR_SUCCESS for a registry user with the right password,
 * MOSQ_ERR_AUTH for a wrong password, a disabled device or a user being slowed down,
 * MOSQ_ERR_PLUGIN_DEFER for a username the registry does not know. Logs every refusal with
 * username, address and reason, never the password. */
int akz_auth_basic(struct akz_auth *auth, const struct akz_registry *reg,
		const struct akz_config *cfg, struct mosquitto_evt_basic_auth *ev);

/* The ACL_CHECK decision for registry users: MOSQ_ERR_SUCCESS or MOSQ_ERR_ACL_DENIED;
 * MOSQ_ERR_PLUGIN_DEFER for clients the registry does not know. receipts_prefix (NULL when
 * receipts are off) lets a device read <prefix><its id>. */
int akz_acl_check(const struct akz_registry *reg, const char *receipts_prefix,
		struct mosquitto_evt_acl_check *ev);

#endif
