/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_jwt.h - minting akenza device JWTs (RS256 / ES256). */
#ifndef AKZ_JWT_H
#define AKZ_JWT_H

#include <stddef.h>
#include <time.h>
#include "akz_keystore.h"

#define AKZ_JWT_LIFETIME_DEFAULT 1200   /* seconds, as akenza's reference client */
#define AKZ_JWT_LIFETIME_MIN 60
#define AKZ_JWT_LIFETIME_MAX 86400

#define AKZ_AUDIENCE_DEFAULT "akenza.io"   /* private clouds: <customer>.akenza.io */
#define AKZ_AUDIENCE_MAX 253

/* Why `audience` cannot stand in a token's "aud" (a phrase such as "is empty"), or NULL if it
 * can: a host name of letters, digits, '.', '-' (and ':' for a port), so that it needs no JSON
 * escaping. Never fails. */
const char *akz_jwt_bad_audience(const char *audience);

/* Mints the JWT for `device_id` signed with `key`:
 *   header {"alg":"RS256|ES256","typ":"JWT","kid":"<kid>"}
 *   claims {"iat":iat,"exp":iat+lifetime,"aud":"https://<audience>/devices/<device_id>"}
 * audience NULL means AKZ_AUDIENCE_DEFAULT.
 * Never touches the disk. Safe to call from several threads, also with the same key.
 * Returns a NUL-terminated token that the caller frees with free(), or NULL with a reason in
 * err (audience malformed, lifetime out of range, device id empty or not valid UTF-8, out of memory, signing failed). */
char *akz_jwt_mint(const struct akz_key *key, const char *audience, const char *device_id, time_t iat,
		long lifetime, char *err, size_t errlen);

#endif
