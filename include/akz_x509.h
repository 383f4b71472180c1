/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_x509.h - self-signed X.509 certificates of device keys (akenza's *_X509_PEM credentials). */
#ifndef AKZ_X509_H
#define AKZ_X509_H

#include <stddef.h>
#include "akz_keystore.h"

#define AKZ_X509_DAYS_DEFAULT 3650   /* gateways run for years; keys change by rotation, not expiry */
#define AKZ_X509_DAYS_MAX 36500

/* Makes a self-signed X.509 v3 certificate for key, as akenza's examples make one with
 * `openssl req -x509 -subj /CN=<deviceId>`: subject and issuer CN=cn, valid from now for `days`
 * (1..AKZ_X509_DAYS_MAX), a random 127-bit serial, SHA-256 signature by the key itself,
 * basicConstraints CA:FALSE, keyUsage digitalSignature, subject and authority key identifiers.
 * Returns the PEM text (caller frees with free()), or NULL with a reason in err (cn empty or
 * longer than X.509's 64 characters, days out of range, signing failed, out of memory). */
char *akz_x509_self_signed(const struct akz_key *key, const char *cn, int days, char *err, size_t errlen);

#endif
