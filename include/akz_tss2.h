/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_tss2.h - the public half of a TPM key blob ("TSS2 PRIVATE KEY" PEM), read without the TPM. */
#ifndef AKZ_TSS2_H
#define AKZ_TSS2_H

#include <stdbool.h>
#include <stddef.h>
#include <openssl/evp.h>

/* True if buf (NUL-terminated) holds a TSS2 PRIVATE KEY PEM block. */
bool akz_tss2_is_pem(const char *buf);

/* Reads the public key out of a TSS2 PRIVATE KEY PEM (len bytes at pem) without asking the TPM:
 * an RSA key or an EC P-256 key with the sign attribute and not restricted. Returns a public key
 * held by OpenSSL's default provider (caller frees), or NULL with a reason in err (malformed,
 * not a loadable key, not a signing key, another curve). */
EVP_PKEY *akz_tss2_public(const char *pem, size_t len, char *err, size_t errlen);

#endif
