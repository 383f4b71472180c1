/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_auth.h - local authentication (BASIC_AUTH) and per-device ACLs (ACL_CHECK). */
#ifndef AKZ_AUTH_H
#define AKZ_AUTH_H

#include <stdbool.h>
#include <time.h>

struct akz_registry;
struct akz_config;
struct mosquitto_evt_basic_auth;
struct mosquitto_evt_acl_check;

/* State of local authentication: the cache of recent successful checks, the per-username
 * failure counters that slow brute force down, the budget of failed checks (all and per client
 * address), and which registry identity each client id is bound to. Broker thread only. */
struct akz_auth;

/* Returns a new state, or NULL when out of memory. With off_thread, and where the broker can
 * answer a login later (Mosquitto 2.1), registry users' checks run on a thread of their own. */
struct akz_auth *akz_auth_new(bool off_thread);
void akz_auth_free(struct akz_auth *auth);

/* Puts reg in force for authentication (at start, and after every reload or control API change):
 * forgets the remembered refusals of reg's users (cached successes hold: they cover the stored
 * hash), drops the client-id bindings of identities reg no longer has, and sizes the equalizing
 * check of unknown usernames to reg's costliest hash. Never fails. */
void akz_auth_sync(struct akz_auth *auth, const struct akz_registry *reg);

/* The BASIC_AUTH decision. MOSQ_ERR_SUCCESS: a registry user with the right password and a client
 * id that is not another registry identity's. MOSQ_ERR_AUTH: a registry user with a wrong
 * password or none, a disabled device, a user locked after failures, a client id that belongs to
 * another identity, or a login that would need a check while failed checks have used their budget.
 * MOSQ_ERR_PLUGIN_DEFER: a username the registry does not know (password_file, dynsec... decide).
 * A login that is not answered from memory costs one password check of the registry's cost,
 * whatever the username; one that does not log anyone in is charged to the budget. Logs every
 * refusal that cost a check with username, client, address and reason (escaped), never the
 * password; the rest goes into a summary line every 10 s. */
int akz_auth_basic(struct akz_auth *auth, const struct akz_registry *reg,
		const struct akz_config *cfg, struct mosquitto_evt_basic_auth *ev);

/* True if registry users' password checks run on a thread of their own (Mosquitto 2.1, whose
 * broker takes a login's answer later); their answers then come from akz_auth_tick. */
bool akz_auth_offloads(const struct akz_auth *auth);

/* The broker reloads: Mosquitto 2.1 then checks every connected client's login again, right
 * after the RELOAD callbacks, and takes no delayed answer there. Until the next akz_auth_tick
 * every check runs on the broker thread. Never fails. */
void akz_auth_reloading(struct akz_auth *auth);

/* Answers the logins whose checks the thread has finished (mosquitto_complete_basic_auth), against
 * reg as it is now. Call from the broker's TICK; nothing to do without the thread. Never fails. */
void akz_auth_tick(struct akz_auth *auth, const struct akz_registry *reg, const struct akz_config *cfg);

/* The ACL_CHECK decision for registry users: MOSQ_ERR_SUCCESS or MOSQ_ERR_ACL_DENIED;
 * MOSQ_ERR_PLUGIN_DEFER for clients the registry does not know. receipts_prefix (NULL when
 * receipts are off) lets a device read <prefix><its id>. */
int akz_acl_check(const struct akz_registry *reg, const char *receipts_prefix,
		struct mosquitto_evt_acl_check *ev);

#endif
