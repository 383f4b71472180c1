/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_keystore.h - device private keys: loading, checking, fingerprints (kid), generation. */
#ifndef AKZ_KEYSTORE_H
#define AKZ_KEYSTORE_H

#include <stdbool.h>
#include <stddef.h>
#include <openssl/evp.h>

/* JWT signing algorithms akenza accepts. */
enum akz_alg {
	AKZ_ALG_NONE = 0,
	AKZ_ALG_RS256 = 1, /* RSA >= 2048 bits, RSASSA-PKCS1-v1_5 + SHA-256 */
	AKZ_ALG_ES256 = 2, /* EC P-256, ECDSA + SHA-256, raw r||s */
};

/* Length of a kid: lowercase hex SHA-256, plus the terminating NUL. */
#define AKZ_KID_LEN 65

/* Options that change how a key is loaded. Zero-initialised means: no passphrase,
 * refuse key files that group or others can read. */
struct akz_key_opts {
	const char *passphrase_file; /* file whose first line is the passphrase of encrypted keys, or NULL */
	bool allow_group_readable;   /* accept key files with group/other permission bits set */
};

/* A loaded, checked private key. Immutable after loading and reference counted, so the
 * broker thread may drop its reference (on reload) while the bridge thread still signs. */
struct akz_key;

/* What a key reference ("key" in the registry, a control API "uri", a command-line key) names. */
enum akz_keyref {
	AKZ_KEYREF_PATH,   /* a local file: a path, or a file: URI in any spelling of the scheme */
	AKZ_KEYREF_STORE,  /* a URI whose scheme a loaded provider has an OSSL_STORE loader for */
	AKZ_KEYREF_BAD,    /* empty, or a file: URI naming another host */
};

/* The one rule for key references. "file:" is compared without regard to case (as OpenSSL does)
 * and file:/p, file:///p, file://localhost/p name the file /p; another scheme counts as a URI only
 * if the key providers or OpenSSL's default context have a loader for it, so "keys:a.pem" is a
 * path. Not on the key thread (it may ask it). For AKZ_KEYREF_PATH, *path points
 * into ref at the file's path (relative paths stay relative); else it is NULL. Never fails. */
enum akz_keyref akz_keyref_parse(const char *ref, const char **path);

/* Loads the private key at `uri`: a plain path, a `file:` URI or any OSSL_STORE URI
 * (handle:0x81000001 for a TPM's persistent key, ... where such a provider is configured:
 * akz_keythread_configure), as akz_keyref_parse tells them apart. A local file is checked before
 * it is read (a regular file, not empty, at most 1 MiB, no group or other permission unless opts
 * allow it), opened without blocking, and decoded from what was read, so a fifo or a device never
 * stalls the caller. A file holding a TPM key blob ("TSS2 PRIVATE KEY" PEM, made by the tpm2
 * provider) is read without the TPM: only its public half is needed until it signs. A URI is
 * opened on the key thread (keythread.c), waiting at most its timeout; a key it yields from a
 * device keeps only its public half here (akz_key_held).
 * Returns 0 and sets *out (one reference, release with akz_key_unref) on success.
 * Returns -1 on failure with a one-line reason in err that names the file; *out is NULL. */
int akz_key_load(const char *uri, const struct akz_key_opts *opts, struct akz_key **out,
		char *err, size_t errlen);

/* Takes one more reference. Never fails. Thread-safe. */
struct akz_key *akz_key_ref(struct akz_key *key);

/* Frees the key store's process-wide decoding state (it is made again when next needed).
 * Call when unloading; never fails. */
void akz_keystore_cleanup(void);

/* Drops one reference and frees the key with the last one. NULL is ignored. Thread-safe. */
void akz_key_unref(struct akz_key *key);

/* The key's algorithm; never AKZ_ALG_NONE for a loaded key. */
enum akz_alg akz_key_alg(const struct akz_key *key);

/* The key's kid (lowercase hex SHA-256 of the uncompressed SubjectPublicKeyInfo DER). */
const char *akz_key_kid(const struct akz_key *key);

/* Where the key was loaded from (as given to akz_key_load). */
const char *akz_key_uri(const struct akz_key *key);

/* The underlying key; owned by `key`. */
EVP_PKEY *akz_key_pkey(const struct akz_key *key);

/* "RS256", "ES256" or "none". */
const char *akz_alg_name(enum akz_alg alg);

/* Computes the kid of any EVP_PKEY (public or private part used) into kid[AKZ_KID_LEN].
 * Returns 0, or -1 with a reason in err. */
int akz_pkey_kid(EVP_PKEY *pkey, char kid[AKZ_KID_LEN], char *err, size_t errlen);

/* Computes the kid of a private or public key file (PEM or DER).
 * Returns 0, or -1 with a reason naming the file in err. */
int akz_file_kid(const char *path, const struct akz_key_opts *opts, char kid[AKZ_KID_LEN],
		char *err, size_t errlen);

/* Returns the public key as a PEM SubjectPublicKeyInfo ("BEGIN PUBLIC KEY") string, the form
 * to upload to akenza. Caller frees with free(). NULL on allocation failure. */
char *akz_key_public_pem(const struct akz_key *key);

/* Generates a new key: alg ES256 (P-256) or RS256 with `bits` (2048, 3072 or 4096).
 * Returns 0 and *out (one reference), or -1 with a reason in err. */
int akz_key_generate(enum akz_alg alg, int bits, struct akz_key **out, char *err, size_t errlen);

/* Generates a new key inside the device of provider `store` ("tpm2"), on the key thread: the
 * private half never exists outside the device. alg and bits as akz_key_generate. The key keeps
 * the provider's PEM of it (a TSS2 blob, useless without that TPM) for akz_key_write.
 * Returns 0 and *out (one reference), or -1 with a reason in err (provider not loaded, device
 * absent or not answering within the key thread's timeout). */
int akz_key_generate_in(const char *store, enum akz_alg alg, int bits, struct akz_key **out,
		char *err, size_t errlen);

/* Signs the certificate *cert with the key (SHA-256): in memory at once, or in the key's device
 * on the key thread (waiting at most its timeout). Returns 0, or -1 with a reason in err that
 * starts with the key's URI; for a key in a device *cert is then NULL (freed, or left to a job
 * still running). */
int akz_key_sign_x509(const struct akz_key *key, X509 **cert, char *err, size_t errlen);

/* True if the key's private half is held in a device (a TPM), not in memory. */
bool akz_key_held(const struct akz_key *key);

/* Where the private half is: "file" (in memory, from a file), or the provider holding it ("tpm2"). */
const char *akz_key_store(const struct akz_key *key);

/* Writes the private key (PKCS#8 PEM, mode 0600, written to a temporary file, fsynced and
 * renamed) to priv_path and, if pub_path is not NULL, the public PEM (mode 0644) to pub_path.
 * A key from akz_key_generate_in writes its device's blob instead, and from then on names
 * priv_path as its URI (call this before sharing the key with another thread).
 * Refuses to overwrite existing files. Returns 0, or -1 with a reason naming the file. */
int akz_key_write(const struct akz_key *key, const char *priv_path, const char *pub_path,
		char *err, size_t errlen);

#endif
