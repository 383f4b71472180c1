/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_keystore_int.h - what jwt.c needs of a key beyond the public key-store interface. */
#ifndef AKZ_KEYSTORE_INT_H
#define AKZ_KEYSTORE_INT_H

#include <stddef.h>
#include "akz_keystore.h"

/* Signs a SHA-256 digest: RS256 gives the PKCS#1 v1.5 signature, ES256 a DER ECDSA-Sig-Value.
 * A key in memory signs with its prepared context; a key held in a device (akz_key_held) is
 * loaded into it and signs on the key thread, the caller waiting up to the key thread's timeout
 * (akz_keythread_timeout_ms). sig must hold EVP_PKEY_get_size() bytes; *siglen is its size on
 * entry and the signature's length on return. Thread-safe. Returns 0, or -1 with a reason in err
 * that starts with the key's URI (for a held key, what the device said follows). */
int akz_key_sign_digest(const struct akz_key *key, const unsigned char digest[32],
		unsigned char *sig, size_t *siglen, char *err, size_t errlen);

/* The key's JWT header, {"alg":..,"kid":..,"typ":"JWT"}, base64url-encoded (made at load). */
const char *akz_key_header_b64(const struct akz_key *key);

/* Encodes the JWT header for alg and kid into out as base64url. Returns its length, or 0 if
 * out is too small. Never fails otherwise. (jwt.c) */
size_t akz_jwt_header_b64(enum akz_alg alg, const char *kid, char *out, size_t outlen);

#endif
