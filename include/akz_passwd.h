/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_passwd.h - local password hashes in mosquitto_passwd's formats ($6$ and $7$, 2.0 and 2.1). */
#ifndef AKZ_PASSWD_H
#define AKZ_PASSWD_H

#include <stdbool.h>
#include <stddef.h>

#define AKZ_PW_ITERATIONS_DEFAULT 210000   /* OWASP's 2023 figure for PBKDF2-HMAC-SHA512 */
#define AKZ_PW_ITERATIONS_MAX 1000000     /* bounds the broker-thread stall per login (passwd.c) */
#define AKZ_PW_ITERATIONS_WEAK 100000     /* fewer is warned about: under half of the default */
#define AKZ_PW_SALT_LEN 12                 /* as mosquitto_passwd 2.0 writes, which 2.0 and 2.1 read */
#define AKZ_PW_SALT_MAX 64                 /* as mosquitto_passwd 2.1 writes */
#define AKZ_PW_HASH_LEN 64

enum akz_pw_kind {
	AKZ_PW_SHA512 = 6,   /* $6$<salt>$<hash>: SHA-512(password || salt) */
	AKZ_PW_PBKDF2 = 7,   /* $7$<iterations>$<salt>$<hash>: PBKDF2-HMAC-SHA512 */
};

/* A parsed hash. */
struct akz_pw {
	enum akz_pw_kind kind;
	int iterations;
	unsigned char salt[AKZ_PW_SALT_MAX];
	size_t salt_len;                       /* AKZ_PW_SALT_LEN or AKZ_PW_SALT_MAX */
	unsigned char hash[AKZ_PW_HASH_LEN];
};

/* Parses text as a $6$ or $7$ hash. Returns 0, or -1 with a reason in err (plain text,
 * unknown scheme, bad base64, wrong lengths, iterations out of 1..AKZ_PW_ITERATIONS_MAX). Never crashes
 * on any input. */
int akz_pw_parse(const char *text, struct akz_pw *out, char *err, size_t errlen);

/* True if password matches; the comparison takes the same time wherever the bytes differ. */
bool akz_pw_verify(const struct akz_pw *pw, const char *password);

/* Hashes password as $7$ with a fresh random salt. Returns a string the caller frees with
 * free(), or NULL with a reason in err. */
char *akz_pw_hash(const char *password, int iterations, char *err, size_t errlen);

#endif
