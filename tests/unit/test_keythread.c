/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* test_keythread.c - unit tests of the key thread (jobs, timeouts, skipping, stopping) and of the
 * TSS2 blob reader (the public half of a TPM key without the TPM). */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>
#include <openssl/evp.h>
#include "akz_keystore.h"
#include "akz_keythread.h"
#include "akz_tss2.h"
#include "akz_util.h"

/* ---- the key thread ------------------------------------------------------------------------ */

static atomic_int freed, ran;

/* A job that blocks the key thread until *gate is set. */
static void run_blocker(void *arg)
{
	atomic_bool *gate = arg;
	while(!atomic_load(gate)) usleep(1000);
}

static void run_count(void *arg)
{
	(void)arg;
	atomic_fetch_add(&ran, 1);
}

static void free_count(void *arg)
{
	(void)arg;
	atomic_fetch_add(&freed, 1);
}

/* Waits up to 2 s for *counter to reach want. */
static bool wait_count(atomic_int *counter, int want)
{
	for(int i = 0; i < 2000 && atomic_load(counter) < want; i++) usleep(1000);
	return atomic_load(counter) >= want;
}

static void reset(void)
{
	atomic_store(&freed, 0);
	atomic_store(&ran, 0);
}

static void test_call_runs_on_the_key_thread(void **state)
{
	(void)state;
	reset();
	assert_false(akz_keythread_current());
	assert_true(akz_kjob_call(run_count, NULL, free_count, 2000));
	assert_int_equal(atomic_load(&ran), 1);
	assert_int_equal(atomic_load(&freed), 0);   /* the argument is the caller's again */
	akz_keythread_stop(2000);
}

static void test_timeout_leaves_the_job_to_finish_alone(void **state)
{
	(void)state;
	reset();
	atomic_bool gate = false;
	struct akz_kjob *blocker = akz_kjob_submit(run_blocker, &gate, NULL);
	assert_non_null(blocker);
	int64_t t0 = akz_mono_ms();
	assert_false(akz_kjob_call(run_count, NULL, free_count, 100));
	int64_t waited = akz_mono_ms() - t0;
	assert_true(waited >= 100 && waited < 1500);
	assert_true(akz_keythread_busy_ms() > 0);
	assert_int_equal(atomic_load(&freed), 0);
	/* The thread has been stuck longer than the next caller would wait: it fails at once. */
	t0 = akz_mono_ms();
	assert_false(akz_kjob_call(run_count, NULL, free_count, 50));
	assert_true(akz_mono_ms() - t0 < 40);
	assert_int_equal(atomic_load(&freed), 1);
	atomic_store(&gate, true);
	/* Released by its caller before it started: skipped, and its argument freed. */
	assert_true(wait_count(&freed, 2));
	assert_int_equal(atomic_load(&ran), 0);
	assert_true(akz_kjob_wait(blocker, 2000));
	akz_kjob_release(blocker);
	assert_int_equal(akz_keythread_busy_ms(), 0);
	akz_keythread_stop(2000);
}

static void test_a_job_waited_for_runs_in_order(void **state)
{
	(void)state;
	reset();
	atomic_bool gate = false;
	struct akz_kjob *blocker = akz_kjob_submit(run_blocker, &gate, NULL);
	struct akz_kjob *j = akz_kjob_submit(run_count, NULL, free_count);
	assert_non_null(j);
	assert_false(akz_kjob_done(j));
	atomic_store(&gate, true);
	assert_true(akz_kjob_wait(j, 2000));
	assert_true(akz_kjob_done(j));
	assert_int_equal(atomic_load(&ran), 1);
	akz_kjob_release(j);
	assert_int_equal(atomic_load(&freed), 1);   /* the last reference frees the argument */
	akz_kjob_release(blocker);
	akz_keythread_stop(2000);
}

static void test_stop_skips_the_queue_and_leaves_a_stuck_thread(void **state)
{
	(void)state;
	reset();
	atomic_bool gate = false;
	struct akz_kjob *blocker = akz_kjob_submit(run_blocker, &gate, NULL);
	struct akz_kjob *j = akz_kjob_submit(run_count, NULL, free_count);
	while(akz_keythread_busy_ms() == 0) usleep(1000);
	int64_t t0 = akz_mono_ms();
	akz_keythread_stop(200);   /* the blocker never returns in time: the thread is left behind */
	assert_true(akz_mono_ms() - t0 < 2500);
	assert_true(akz_kjob_done(j));
	assert_false(akz_kjob_wait(j, 0));   /* skipped, not run */
	akz_kjob_release(j);
	assert_int_equal(atomic_load(&freed), 1);
	assert_int_equal(atomic_load(&ran), 0);
	/* A new thread serves the next job. */
	assert_true(akz_kjob_call(run_count, NULL, NULL, 2000));
	atomic_store(&gate, true);
	assert_true(akz_kjob_wait(blocker, 2000));
	akz_kjob_release(blocker);
	akz_keythread_stop(2000);
}

static void test_configure_once_before_use(void **state)
{
	(void)state;
	char err[512];
	assert_int_equal(akz_keythread_configure(NULL, "/nonexistent/openssl.cnf", err, sizeof(err)), -1);
	assert_non_null(strstr(err, "/nonexistent/openssl.cnf"));
	assert_int_equal(akz_keythread_has_loader("file"), 0);   /* none configured: not asked */
	assert_int_equal(akz_keythread_configure("default", NULL, err, sizeof(err)), 0);
	assert_int_equal(akz_keythread_configure("default,base", NULL, err, sizeof(err)), 0);
	/* The configured providers' URI schemes: the default provider loads file: URIs only. */
	assert_int_equal(akz_keythread_has_loader("file"), 1);
	assert_int_equal(akz_keythread_has_loader("handle"), 0);
	assert_int_equal(akz_keythread_configure("default", NULL, err, sizeof(err)), -1);   /* in use */
	akz_keythread_cleanup();
	/* A provider that does not load: cannot tell. */
	assert_int_equal(akz_keythread_configure("no-such-provider", NULL, err, sizeof(err)), 0);
	assert_int_equal(akz_keythread_has_loader("handle"), -1);
	akz_keythread_cleanup();
}

/* ---- the TSS2 blob reader ------------------------------------------------------------------ */

/* A blob made by akenzactl keygen --store tpm2 (an EC P-256 key), and its kid. */
#define EC_BLOB "fuzz/corpus/tss2/ec-keygen.der"
#define EC_KID "6e34f00096e152cca9dfb0307b1c2cbe39293ff8d2250a96c71d4cb2d35ef7ef"
#define RSA_BLOB "fuzz/corpus/tss2/rsa-keygen.der"
#define RSA_KID "1c0b632e5acee3ed33d129db6e92ef3f0a8aa4acaddbc1dd615b08a7ac0b7373"

static size_t read_der(const char *path, unsigned char *buf, size_t size)
{
	FILE *f = fopen(path, "rb");
	assert_non_null(f);
	size_t n = fread(buf, 1, size, f);
	fclose(f);
	assert_true(n > 0 && n < size);
	return n;
}

/* akz_tss2_public of the DER wrapped in PEM; returns the key (or NULL with err). */
static EVP_PKEY *parse_der(const unsigned char *der, size_t len, char *err, size_t errlen)
{
	char pem[4096];
	int n = snprintf(pem, sizeof(pem), "-----BEGIN TSS2 PRIVATE KEY-----\n");
	for(size_t off = 0; off < len; off += 48){
		n += EVP_EncodeBlock((unsigned char *)pem + n, der + off, (int)(len - off < 48 ? len - off : 48));
		pem[n++] = '\n';
	}
	n += snprintf(pem + n, sizeof(pem) - (size_t)n, "-----END TSS2 PRIVATE KEY-----\n");
	assert_true(akz_tss2_is_pem(pem));
	return akz_tss2_public(pem, (size_t)n, err, errlen);
}

/* Offset of the TPMT_PUBLIC's type field (0x0023 ECC, then nameAlg SHA-256 0x000b) in der. */
static size_t public_area(const unsigned char *der, size_t len, unsigned type)
{
	for(size_t i = 0; i + 4 < len; i++){
		if(der[i] == (type >> 8) && der[i+1] == (type & 0xff) && der[i+2] == 0x00 && der[i+3] == 0x0b) return i;
	}
	fail_msg("no public area");
	return 0;
}

static void test_tss2_public_halves_give_the_tpm_kids(void **state)
{
	(void)state;
	static const struct { const char *file, *kid, *type; } cases[] = {
		{EC_BLOB, EC_KID, "EC"}, {RSA_BLOB, RSA_KID, "RSA"},
	};
	for(size_t i = 0; i < 2; i++){
		unsigned char der[2048];
		char err[256] = "", kid[AKZ_KID_LEN];
		size_t len = read_der(cases[i].file, der, sizeof(der));
		EVP_PKEY *pkey = parse_der(der, len, err, sizeof(err));
		if(pkey == NULL) fail_msg("%s: %s", cases[i].file, err);
		assert_true(EVP_PKEY_is_a(pkey, cases[i].type));
		assert_int_equal(akz_pkey_kid(pkey, kid, err, sizeof(err)), 0);
		assert_string_equal(kid, cases[i].kid);
		EVP_PKEY_free(pkey);
	}
}

static void test_tss2_refusals_say_why(void **state)
{
	(void)state;
	unsigned char der[2048], bad[2048] = {0};
	char err[256];
	size_t len = read_der(EC_BLOB, der, sizeof(der));
	size_t at = public_area(der, len, 0x0023);

	/* cut short */
	assert_null(parse_der(der, len - 20, err, sizeof(err)));
	assert_non_null(strstr(err, "malformed"));
	/* not a signing key: the sign attribute (0x00040000) cleared */
	memcpy(bad, der, len);
	bad[at + 5] &= (unsigned char)~0x04;
	assert_null(parse_der(bad, len, err, sizeof(err)));
	assert_non_null(strstr(err, "cannot sign tokens"));
	/* another curve: P-384 (0x0004) where P-256 (0x0003) was */
	memcpy(bad, der, len);
	assert_int_equal(bad[at + 15], 0x03);
	bad[at + 15] = 0x04;
	assert_null(parse_der(bad, len, err, sizeof(err)));
	assert_non_null(strstr(err, "only P-256"));
	/* another kind of TSS2 object (an importable key, 2.23.133.10.1.4) */
	memcpy(bad, der, len);
	assert_int_equal(bad[10], 0x03);
	bad[10] = 0x04;
	assert_null(parse_der(bad, len, err, sizeof(err)));
	assert_non_null(strstr(err, "only loadable keys"));
	/* a point not on the curve */
	memcpy(bad, der, len);
	bad[at + 22] ^= 0x01;
	assert_null(parse_der(bad, len, err, sizeof(err)));
	assert_non_null(strstr(err, "not a point on P-256"));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_call_runs_on_the_key_thread),
		cmocka_unit_test(test_timeout_leaves_the_job_to_finish_alone),
		cmocka_unit_test(test_a_job_waited_for_runs_in_order),
		cmocka_unit_test(test_stop_skips_the_queue_and_leaves_a_stuck_thread),
		cmocka_unit_test(test_configure_once_before_use),
		cmocka_unit_test(test_tss2_public_halves_give_the_tpm_kids),
		cmocka_unit_test(test_tss2_refusals_say_why),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
