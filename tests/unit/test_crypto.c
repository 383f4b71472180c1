/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* test_crypto.c - unit tests of the key store, JWT minting, password hashes and the registry. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>
#include <openssl/ecdsa.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include "akz_jwt.h"
#include "akz_keystore.h"
#include "akz_passwd.h"
#include "akz_registry.h"
#include "akz_x509.h"

static char dir[256];

static void path_in(char *out, size_t n, const char *name)
{
	snprintf(out, n, "%s/%s", dir, name);
}

static void write_text(const char *name, const char *text, mode_t mode)
{
	char p[512];
	path_in(p, sizeof(p), name);
	FILE *f = fopen(p, "w");
	assert_non_null(f);
	fputs(text, f);
	fclose(f);
	chmod(p, mode);
}

/* Generates a key with OpenSSL and writes it as PKCS#8 PEM, mode 0600. */
static void write_key(const char *name, const char *alg, const char *param)
{
	EVP_PKEY *k = strcmp(alg, "RSA") == 0 ? EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)atoi(param))
			: EVP_PKEY_Q_keygen(NULL, NULL, alg, param);
	assert_non_null(k);
	char p[512];
	path_in(p, sizeof(p), name);
	FILE *f = fopen(p, "w");
	assert_non_null(f);
	assert_int_equal(PEM_write_PrivateKey(f, k, NULL, NULL, 0, NULL, NULL), 1);
	fclose(f);
	chmod(p, 0600);
	EVP_PKEY_free(k);
}

static int setup(void **state)
{
	(void)state;
	snprintf(dir, sizeof(dir), "/tmp/akz-unit-XXXXXX");
	assert_non_null(mkdtemp(dir));
	write_key("ec.pem", "EC", "P-256");
	write_key("rsa.pem", "RSA", "2048");
	write_key("rsa1024.pem", "RSA", "1024");
	write_key("p384.pem", "EC", "P-384");
	write_key("ed.pem", "ED25519", NULL);
	return 0;
}

static int teardown(void **state)
{
	(void)state;
	char cmd[300];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	return system(cmd) == 0 ? 0 : -1;
}

static struct akz_key *load_ok(const char *name)
{
	char p[512], err[512];
	struct akz_key *k = NULL;
	path_in(p, sizeof(p), name);
	if(akz_key_load(p, NULL, &k, err, sizeof(err))) fail_msg("%s", err);
	return k;
}

static void expect_refusal(const char *name, const char *want)
{
	char p[512], err[512] = "";
	struct akz_key *k = (struct akz_key *)1;
	path_in(p, sizeof(p), name);
	assert_int_equal(akz_key_load(p, NULL, &k, err, sizeof(err)), -1);
	assert_null(k);
	if(strstr(err, want) == NULL || strstr(err, p) == NULL) fail_msg("%s: got '%s'", name, err);
}

static void test_accepts_and_chooses_alg(void **state)
{
	(void)state;
	struct akz_key *ec = load_ok("ec.pem"), *rsa = load_ok("rsa.pem");
	assert_int_equal(akz_key_alg(ec), AKZ_ALG_ES256);
	assert_int_equal(akz_key_alg(rsa), AKZ_ALG_RS256);
	assert_int_equal(strlen(akz_key_kid(ec)), 64);
	assert_int_equal(strspn(akz_key_kid(ec), "0123456789abcdef"), 64);
	assert_string_not_equal(akz_key_kid(ec), akz_key_kid(rsa));
	char *pem = akz_key_public_pem(ec);
	assert_non_null(strstr(pem, "BEGIN PUBLIC KEY"));
	free(pem);
	/* references: the key lives while anyone holds one */
	assert_ptr_equal(akz_key_ref(ec), ec);
	akz_key_unref(ec);
	assert_int_equal(akz_key_alg(ec), AKZ_ALG_ES256);
	akz_key_unref(ec);
	akz_key_unref(rsa);
	akz_key_unref(NULL);
}

static void test_refusals(void **state)
{
	(void)state;
	expect_refusal("rsa1024.pem", "RSA key of 1024 bits");
	expect_refusal("p384.pem", "EC curve secp384r1");
	expect_refusal("ed.pem", "ED25519 key");
	write_text("garbage.pem", "-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n", 0600);
	expect_refusal("garbage.pem", "no private key found");
	write_text("empty.pem", "", 0600);
	expect_refusal("empty.pem", "empty file");
	expect_refusal("missing.pem", "No such file");
	expect_refusal("", "is a directory");   /* the directory itself */
	char p[512], q[512];
	path_in(p, sizeof(p), "ec.pem");
	path_in(q, sizeof(q), "ec-open.pem");
	char cmd[1700];
	snprintf(cmd, sizeof(cmd), "cp %s %s && chmod 640 %s", p, q, q);
	assert_int_equal(system(cmd), 0);
	expect_refusal("ec-open.pem", "mode 0640");
	struct akz_key_opts o = {.allow_group_readable = true};
	struct akz_key *k;
	char err[256];
	assert_int_equal(akz_key_load(q, &o, &k, err, sizeof(err)), 0);
	akz_key_unref(k);
}

/* Verifies a token's signature with OpenSSL directly. */
static bool verify_token(const struct akz_key *key, const char *tok)
{
	const char *dot = strrchr(tok, '.');
	char b64[1400];
	size_t n = strlen(dot + 1);
	memcpy(b64, dot + 1, n);
	for(size_t i = 0; i < n; i++) b64[i] = b64[i] == '-' ? '+' : b64[i] == '_' ? '/' : b64[i];
	while(n % 4) b64[n++] = '=';
	b64[n] = '\0';
	unsigned char sig[1100], der[80];
	int len = EVP_DecodeBlock(sig, (unsigned char *)b64, (int)n);
	len -= (b64[n-1] == '=') + (b64[n-2] == '=');
	const unsigned char *use = sig;
	size_t uselen = (size_t)len;
	if(len < 0) return false;
	if(akz_key_alg(key) == AKZ_ALG_ES256){
		assert_int_equal(len, 64);
		ECDSA_SIG *es = ECDSA_SIG_new();
		ECDSA_SIG_set0(es, BN_bin2bn(sig, 32, NULL), BN_bin2bn(sig + 32, 32, NULL));
		unsigned char *p = der;
		uselen = (size_t)i2d_ECDSA_SIG(es, &p);
		ECDSA_SIG_free(es);
		use = der;
	}
	EVP_MD_CTX *ctx = EVP_MD_CTX_new();
	bool ok = EVP_DigestVerifyInit(ctx, NULL, EVP_sha256(), NULL, akz_key_pkey(key)) == 1
			&& EVP_DigestVerify(ctx, use, uselen, (const unsigned char *)tok, (size_t)(dot - tok)) == 1;
	EVP_MD_CTX_free(ctx);
	return ok;
}

static void test_jwt(void **state)
{
	(void)state;
	const char *names[] = {"ec.pem", "rsa.pem"};
	for(int i = 0; i < 2; i++){
		struct akz_key *k = load_ok(names[i]);
		char err[256];
		char *tok = akz_jwt_mint(k, NULL, "dev-1", 1700000000, 1200, err, sizeof(err));
		assert_non_null(tok);
		assert_null(strchr(tok, '='));
		/* claims exactly as PyJWT writes them for the reference client */
		const char *c = strchr(tok, '.') + 1;
		assert_memory_equal(c, "eyJpYXQiOjE3MDAwMDAwMDAsImV4cCI6MTcwMDAwMTIwMCwiYXVkIjoiaHR0cHM6Ly9ha2VuemEuaW8vZGV2aWNlcy9kZXYtMSJ9.", 100);
		assert_true(verify_token(k, tok));
		char *last = &tok[strlen(tok) - 3];
		*last = *last == 'A' ? 'B' : 'A';   /* any change breaks it */
		assert_false(verify_token(k, tok));
		free(tok);
		assert_null(akz_jwt_mint(k, NULL, "d", 0, 59, err, sizeof(err)));
		assert_non_null(strstr(err, "lifetime"));
		assert_null(akz_jwt_mint(k, NULL, "d", 0, 86401, err, sizeof(err)));
		assert_null(akz_jwt_mint(k, NULL, "", 0, 60, err, sizeof(err)));
		assert_null(akz_jwt_mint(k, NULL, "a\nb", 0, 60, err, sizeof(err)));
		assert_non_null(strstr(err, "control character"));
		assert_null(akz_jwt_mint(k, NULL, "a\xc0\xafz", 0, 60, err, sizeof(err)));   /* overlong '/' */
		assert_non_null(strstr(err, "UTF-8"));
		tok = akz_jwt_mint(k, NULL, "q\"u\\o", 0, 60, err, sizeof(err));
		assert_non_null(tok);
		free(tok);
		/* a private cloud's audience: {"iat":0,"exp":60,"aud":"https://acme.akenza.io/devices/d"} */
		tok = akz_jwt_mint(k, "acme.akenza.io", "d", 0, 60, err, sizeof(err));
		assert_non_null(tok);
		c = strchr(tok, '.') + 1;
		assert_memory_equal(c, "eyJpYXQiOjAsImV4cCI6NjAsImF1ZCI6Imh0dHBzOi8vYWNtZS5ha2VuemEuaW8vZGV2aWNlcy9kIn0.", 80);
		assert_true(verify_token(k, tok));
		free(tok);
		const char *bad_aud[] = {"", "a/b", "a\"b", ".akenza.io", "x y"};
		for(size_t j = 0; j < sizeof(bad_aud)/sizeof(bad_aud[0]); j++){
			assert_null(akz_jwt_mint(k, bad_aud[j], "d", 0, 60, err, sizeof(err)));
			assert_non_null(strstr(err, "audience"));
		}
		akz_key_unref(k);
	}
}

/* A certificate of each key kind: CN, its own key inside, signed by that key, the validity asked. */
static void test_self_signed_certificate(void **state)
{
	(void)state;
	const char *names[] = {"ec.pem", "rsa.pem"};
	for(int i = 0; i < 2; i++){
		struct akz_key *k = load_ok(names[i]);
		char err[256];
		char *pem = akz_x509_self_signed(k, "0A1FFFFFFFFFFF", 30, err, sizeof(err));
		assert_non_null(pem);
		BIO *bio = BIO_new_mem_buf(pem, -1);
		X509 *x = PEM_read_bio_X509(bio, NULL, NULL, NULL);
		assert_non_null(x);
		char cn[80];
		assert_int_equal(X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, sizeof(cn)), 14);
		assert_string_equal(cn, "0A1FFFFFFFFFFF");
		assert_int_equal(X509_NAME_cmp(X509_get_subject_name(x), X509_get_issuer_name(x)), 0);
		assert_int_equal(EVP_PKEY_eq(X509_get0_pubkey(x), akz_key_pkey(k)), 1);
		assert_int_equal(X509_verify(x, akz_key_pkey(k)), 1);
		int days, secs;
		assert_int_equal(ASN1_TIME_diff(&days, &secs, X509_get0_notBefore(x), X509_get0_notAfter(x)), 1);
		assert_int_equal(days, 30);
		assert_int_equal(secs, 0);
		assert_int_equal(X509_get_version(x), X509_VERSION_3);
		X509_free(x);
		BIO_free(bio);
		free(pem);
		char two[2][8192];
		for(int j = 0; j < 2; j++){
			pem = akz_x509_self_signed(k, "d", 1, err, sizeof(err));
			assert_non_null(pem);
			snprintf(two[j], sizeof(two[j]), "%s", pem);
			free(pem);
		}
		assert_string_not_equal(two[0], two[1]);   /* fresh serials */
		char long_cn[70];
		memset(long_cn, 'x', sizeof(long_cn) - 1);
		long_cn[sizeof(long_cn) - 1] = '\0';
		assert_null(akz_x509_self_signed(k, long_cn, 30, err, sizeof(err)));
		assert_non_null(strstr(err, "common name"));
		assert_null(akz_x509_self_signed(k, "", 30, err, sizeof(err)));
		assert_null(akz_x509_self_signed(k, "d", 0, err, sizeof(err)));
		assert_null(akz_x509_self_signed(k, "d", AKZ_X509_DAYS_MAX + 1, err, sizeof(err)));
		assert_non_null(strstr(err, "days"));
		assert_null(akz_x509_self_signed(k, "a\xff", 30, err, sizeof(err)));
		akz_key_unref(k);
	}
}

static void test_generate_and_write(void **state)
{
	(void)state;
	struct akz_key *k;
	char err[256], priv[512], pub[512];
	assert_int_equal(akz_key_generate(AKZ_ALG_ES256, 0, &k, err, sizeof(err)), 0);
	path_in(priv, sizeof(priv), "gen.pem");
	path_in(pub, sizeof(pub), "gen.pub.pem");
	assert_int_equal(akz_key_write(k, priv, pub, err, sizeof(err)), 0);
	struct stat sb;
	assert_int_equal(stat(priv, &sb), 0);
	assert_int_equal(sb.st_mode & 0777, 0600);
	assert_int_equal(akz_key_write(k, priv, pub, err, sizeof(err)), -1);
	assert_non_null(strstr(err, "already exists"));
	char kid[AKZ_KID_LEN];
	assert_int_equal(akz_file_kid(pub, NULL, kid, err, sizeof(err)), 0);
	assert_string_equal(kid, akz_key_kid(k));
	akz_key_unref(k);
	assert_int_equal(akz_key_generate(AKZ_ALG_RS256, 1024, &k, err, sizeof(err)), -1);
	/* a "key" larger than any key file is refused before OpenSSL reads it */
	char big[512];
	path_in(big, sizeof(big), "big.pem");
	FILE *f = fopen(big, "w");
	assert_non_null(f);
	assert_int_equal(fseek(f, 2L * 1024 * 1024, SEEK_SET), 0);
	fputc('x', f);
	fclose(f);
	chmod(big, 0600);
	assert_int_equal(akz_key_load(big, NULL, &k, err, sizeof(err)), -1);
	assert_non_null(strstr(err, "larger than any key file"));
}

/* Writes k to name in one of the encodings a key file may have, mode 0600. */
enum key_form { FORM_PKCS8, FORM_TRADITIONAL, FORM_DER, FORM_PARAMS_FIRST, FORM_ENCRYPTED,
	FORM_TWO_KEYS, FORM_PUBLIC };

static void write_form(const char *name, EVP_PKEY *k, enum key_form form)
{
	char p[512];
	path_in(p, sizeof(p), name);
	FILE *f = fopen(p, "w");
	assert_non_null(f);
	BIO *bio = BIO_new_fp(f, BIO_NOCLOSE);
	assert_non_null(bio);
	int ok = 1;
	switch(form){
	case FORM_PKCS8: ok = PEM_write_PrivateKey(f, k, NULL, NULL, 0, NULL, NULL); break;
	case FORM_TRADITIONAL: ok = PEM_write_bio_PrivateKey_traditional(bio, k, NULL, NULL, 0, NULL, NULL); break;
	case FORM_DER: ok = i2d_PrivateKey_fp(f, k); break;
	case FORM_PARAMS_FIRST:
		BIO_puts(bio, "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n");
		ok = PEM_write_bio_PrivateKey_traditional(bio, k, NULL, NULL, 0, NULL, NULL);
		break;
	case FORM_ENCRYPTED:
		ok = PEM_write_PrivateKey(f, k, EVP_aes_256_cbc(), (unsigned char *)"pass phrase", 11, NULL, NULL);
		break;
	case FORM_TWO_KEYS:
		ok = PEM_write_PrivateKey(f, k, NULL, NULL, 0, NULL, NULL) && PEM_write_PrivateKey(f, k, NULL, NULL, 0, NULL, NULL);
		break;
	case FORM_PUBLIC: ok = PEM_write_PUBKEY(f, k); break;
	}
	assert_int_equal(ok, 1);
	BIO_free(bio);
	fclose(f);
	chmod(p, 0600);
}

/* Every encoding of a key loads to the same kid, whether the shared PEM decoder takes it (one
 * plain PEM key) or OSSL_STORE does (DER, encrypted, more than one block); what is not one
 * private key is refused with the reason, on either path. */
static void test_key_forms(void **state)
{
	(void)state;
	write_text("pass.txt", "pass phrase\n", 0600);
	char pass[512];
	path_in(pass, sizeof(pass), "pass.txt");
	struct akz_key_opts with_pass = {.passphrase_file = pass};
	static const char *const algs[][2] = {{"EC", "P-256"}, {"RSA", "2048"}};
	for(size_t a = 0; a < 2; a++){
		EVP_PKEY *k = strcmp(algs[a][0], "RSA") == 0 ? EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048)
				: EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
		assert_non_null(k);
		char want[AKZ_KID_LEN], err[512];
		assert_int_equal(akz_pkey_kid(k, want, err, sizeof(err)), 0);
		static const enum key_form loadable[] = {FORM_PKCS8, FORM_TRADITIONAL, FORM_DER,
			FORM_PARAMS_FIRST, FORM_ENCRYPTED};
		for(size_t i = 0; i < sizeof(loadable) / sizeof(loadable[0]); i++){
			if(loadable[i] == FORM_PARAMS_FIRST && a == 1) continue;
			char name[32], p[512];
			snprintf(name, sizeof(name), "form-%zu-%zu.key", a, i);
			write_form(name, k, loadable[i]);
			path_in(p, sizeof(p), name);
			struct akz_key *got = NULL;
			if(akz_key_load(p, &with_pass, &got, err, sizeof(err))) fail_msg("%s: %s", name, err);
			assert_string_equal(akz_key_kid(got), want);
			/* loaded twice: the shared decoder gives a fresh key each time */
			struct akz_key *again = NULL;
			assert_int_equal(akz_key_load(p, &with_pass, &again, err, sizeof(err)), 0);
			assert_ptr_not_equal(akz_key_pkey(again), akz_key_pkey(got));
			assert_string_equal(akz_key_kid(again), want);
			akz_key_unref(again);
			akz_key_unref(got);
		}
		char name[32];
		snprintf(name, sizeof(name), "two-%zu.pem", a);
		write_form(name, k, FORM_TWO_KEYS);
		expect_refusal(name, "more than one private key");
		snprintf(name, sizeof(name), "pub-%zu.pem", a);
		write_form(name, k, FORM_PUBLIC);
		expect_refusal(name, "public key but no private key");
		snprintf(name, sizeof(name), "enc-%zu.pem", a);
		write_form(name, k, FORM_ENCRYPTED);
		expect_refusal(name, "the key is encrypted");
		EVP_PKEY_free(k);
	}
	/* the decoder's process-wide state is dropped and made again */
	akz_keystore_cleanup();
	akz_key_unref(load_ok("ec.pem"));
}

static void test_passwords(void **state)
{
	(void)state;
	struct akz_pw pw;
	char err[256];
	/* made by mosquitto_passwd 2.0.11: "secret" */
	assert_int_equal(akz_pw_parse("$7$101$NwjylbCRZwEpqPIK$Yv03m6CKOpvWy5oKIJCqIWgwpCfD+x/3KP5bEDDwkS9jLeIjdCRHcOqU4kT2+VB9/ObqWA0buPl5uARhIC6OiQ==", &pw, err, sizeof(err)), 0);
	assert_true(akz_pw_verify(&pw, "secret"));
	assert_false(akz_pw_verify(&pw, "secreT"));
	assert_false(akz_pw_verify(&pw, ""));
	assert_int_equal(akz_pw_parse("$6$stGpGYC10cZUvzfm$M2J/IE7ML3l0asGBMR6vsTy8fjVRxjBh1dLTuts3XAHbfx4b07m8oMa111VDswbq2rUyiKVXtqZMr4FHucQwng==", &pw, err, sizeof(err)), 0);
	assert_true(akz_pw_verify(&pw, "secret"));
	/* made by mosquitto_passwd 2.1.2 (64-byte salts): "secret" */
	assert_int_equal(akz_pw_parse("$7$1000$uIjaE9oQ4POVBK4317wzOwty8cDCORQVApGABeU0/Ea8CmCYN4iNFyEMMJv3Vj0794ox5VTCy9mRJ1w9oZQ8EA==$MYVV6y2qdn/G4sJ5JCvkZqMzVhaoS1QAk2ccIFbxTEAU9nld7mbCJi57d6BFezv/33b65HJm3rtRH+0HfTH6Pw==", &pw, err, sizeof(err)), 0);
	assert_true(akz_pw_verify(&pw, "secret"));
	assert_false(akz_pw_verify(&pw, "secreT"));
	assert_int_equal(akz_pw_parse("$6$kY+qO1E0rRN1mjXn3xWxdQe3jwMMkWWFTeLqiKmqzditTd7bjWIwEtLwujGsj3SmWqsI6M+qBIQOf+96rBzcaQ==$CGf6ZINF9J1JhMwDOlITKwQ9+xCj6NLcmaGwOVCSqztD/dk1dejpBWtx40uE+BPovmSMYyEC1wWpbJ1qWBqLDQ==", &pw, err, sizeof(err)), 0);
	assert_true(akz_pw_verify(&pw, "secret"));
	assert_false(akz_pw_verify(&pw, "secreT"));
	char *h = akz_pw_hash("pw", 1000, err, sizeof(err));
	assert_non_null(h);
	/* 12-byte salts (16 base64 characters), which Mosquitto 2.0's password_file reads too */
	assert_memory_equal(h, "$7$1000$", 8);
	assert_int_equal(strchr(h + 8, '$') - (h + 8), 16);
	assert_int_equal(akz_pw_parse(h, &pw, err, sizeof(err)), 0);
	assert_true(akz_pw_verify(&pw, "pw"));
	free(h);
	const char *bad[] = {"secret", "", "$5$abc$def", "$7$", "$7$0$NwjylbCRZwEpqPIK$YQ==", "$7$x$a$b",
		"$7$101$Nwjy$Yv03", "$6$NwjylbCRZwEpqPIK$", "$7$101$NwjylbCRZwEpqPIK$Yv03m6CK$extra",
		"$7$99999999999$NwjylbCRZwEpqPIK$Yv03", "$6$!!!!!!!!!!!!!!!!$M2J/",
		/* a 15-byte salt: neither 12 nor 64 */
		"$7$101$NwjylbCRZwEpqPIKNwjy$Yv03m6CKOpvWy5oKIJCqIWgwpCfD+x/3KP5bEDDwkS9jLeIjdCRHcOqU4kT2+VB9/ObqWA0buPl5uARhIC6OiQ==",
		NULL};
	for(int i = 0; bad[i]; i++){
		if(akz_pw_parse(bad[i], &pw, err, sizeof(err)) != -1) fail_msg("accepted '%s'", bad[i]);
	}
	assert_int_equal(akz_pw_parse(NULL, &pw, err, sizeof(err)), -1);
	/* made by mosquitto_passwd 2.1.2 -H argon2id: refused, and told why */
	assert_int_equal(akz_pw_parse("$argon2id$v=19$m=65536,t=3,p=1$c2FsdHNhbHQ$aGFzaGhhc2g", &pw, err, sizeof(err)), -1);
	assert_non_null(strstr(err, "argon2id"));
	/* the iteration bound (the fuzzer's first finding): 10,000,000 stalled the broker ~4 s */
	char big[160];
	snprintf(big, sizeof(big), "$7$%d$NwjylbCRZwEpqPIK$Yv03m6CKOpvWy5oKIJCqIWgwpCfD+x/3KP5bEDDwkS9jLeIjdCRHcOqU4kT2+VB9/ObqWA0buPl5uARhIC6OiQ==",
			AKZ_PW_ITERATIONS_MAX + 1);
	assert_int_equal(akz_pw_parse(big, &pw, err, sizeof(err)), -1);
	assert_non_null(strstr(err, "iterations"));
	snprintf(big, sizeof(big), "$7$%d$NwjylbCRZwEpqPIK$Yv03m6CKOpvWy5oKIJCqIWgwpCfD+x/3KP5bEDDwkS9jLeIjdCRHcOqU4kT2+VB9/ObqWA0buPl5uARhIC6OiQ==",
			AKZ_PW_ITERATIONS_MAX);
	assert_int_equal(akz_pw_parse(big, &pw, err, sizeof(err)), 0);
	assert_null(akz_pw_hash("pw", AKZ_PW_ITERATIONS_MAX + 1, err, sizeof(err)));
}

struct problems {
	int n;
	char all[4096];
};

static void collect(void *ctx, const char *msg)
{
	struct problems *p = ctx;
	p->n++;
	strncat(p->all, msg, sizeof(p->all) - strlen(p->all) - 2);
	strcat(p->all, "\n");
}

static void test_registry(void **state)
{
	(void)state;
	char reg[512];
	struct problems p = {0};
	struct akz_registry *r;
	path_in(reg, sizeof(reg), "devices.json");
	char text[2048];
	snprintf(text, sizeof(text),
			"{\"devices\":[{\"id\":\"e\",\"password\":\"$7$101$NwjylbCRZwEpqPIK$Yv03m6CKOpvWy5oKIJCqIWgwpCfD+x/3KP5bEDDwkS9jLeIjdCRHcOqU4kT2+VB9/ObqWA0buPl5uARhIC6OiQ==\",\"key\":\"ec.pem\"},"
			"{\"id\":\"r\",\"username\":\"ru\",\"password\":\"$7$101$NwjylbCRZwEpqPIK$Yv03m6CKOpvWy5oKIJCqIWgwpCfD+x/3KP5bEDDwkS9jLeIjdCRHcOqU4kT2+VB9/ObqWA0buPl5uARhIC6OiQ==\",\"key\":\"%s/rsa.pem\",\"enabled\":false}],"
			"\"gateways\":[{\"username\":\"gw\",\"password\":\"$7$101$NwjylbCRZwEpqPIK$Yv03m6CKOpvWy5oKIJCqIWgwpCfD+x/3KP5bEDDwkS9jLeIjdCRHcOqU4kT2+VB9/ObqWA0buPl5uARhIC6OiQ==\",\"devices\":[\"e\"]}]}", dir);
	write_text("devices.json", text, 0600);
	assert_int_equal(akz_registry_load(reg, NULL, NULL, collect, &p, &r), 0);
	assert_int_equal(akz_registry_device_count(r), 2);
	assert_string_equal(akz_registry_find_device(r, "e")->username, "e");
	assert_false(akz_registry_find_device_by_username(r, "ru")->enabled);
	assert_null(akz_registry_find_device_by_username(r, "r"));
	assert_true(akz_gateway_serves(akz_registry_find_gateway(r, "gw"), "e"));
	assert_false(akz_gateway_serves(akz_registry_find_gateway(r, "gw"), "r"));
	assert_null(akz_registry_find_gateway(r, "e"));
	akz_registry_free(r);

	write_text("devices.json", "{\"devices\":[{\"id\":\"a/b\",\"password\":\"x\",\"colour\":1},{\"id\":7}],\"gateways\":{}}", 0600);
	memset(&p, 0, sizeof(p));
	assert_int_equal(akz_registry_load(reg, NULL, NULL, collect, &p, &r), -1);
	assert_null(r);
	assert_non_null(strstr(p.all, "gateways: must be an array"));
	write_text("devices.json", "{\"devices\":[{\"id\":\"a/b\",\"password\":\"x\",\"colour\":1},{\"id\":7}]}", 0600);
	memset(&p, 0, sizeof(p));
	assert_int_equal(akz_registry_load(reg, NULL, NULL, collect, &p, &r), -1);
	assert_non_null(strstr(p.all, "devices[0]: unknown field 'colour'"));
	assert_non_null(strstr(p.all, "devices[0].id: 'a/b' contains"));
	assert_non_null(strstr(p.all, "devices[0].password: not a password hash"));
	assert_non_null(strstr(p.all, "devices[1].id: must be a string"));
	assert_true(p.n >= 5);
	write_text("devices.json", "{\"devices\": [\n{\"id\": }\n]}", 0600);
	memset(&p, 0, sizeof(p));
	assert_int_equal(akz_registry_load(reg, NULL, NULL, collect, &p, &r), -1);
	assert_non_null(strstr(p.all, "line 2, column"));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_accepts_and_chooses_alg),
		cmocka_unit_test(test_refusals),
		cmocka_unit_test(test_jwt),
		cmocka_unit_test(test_self_signed_certificate),
		cmocka_unit_test(test_generate_and_write),
		cmocka_unit_test(test_key_forms),
		cmocka_unit_test(test_passwords),
		cmocka_unit_test(test_registry),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
