/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* bench_jwt.c - tokens per second from akz_jwt_mint and from libjwt 1.x, same key, same claims, one
 * core; and key files loaded per second by akz_key_load and by OpenSSL's generic loaders. */
#include <jwt.h>
#include <openssl/pem.h>
#include <openssl/store.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "akz_jwt.h"
#include "akz_keystore.h"
#include "akz_keythread.h"

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Mints for `seconds` and returns tokens per second. */
static double bench_ours(const struct akz_key *key, double seconds)
{
	char err[256];
	long n = 0;
	double t0 = now_s(), t;
	do{
		for(int i = 0; i < 32; i++){
			char *tok = akz_jwt_mint(key, NULL, "bench-device-0001", time(NULL), 1200, err, sizeof(err));
			if(tok == NULL){
				fprintf(stderr, "mint: %s\n", err);
				exit(1);
			}
			free(tok);
			n++;
		}
		t = now_s();
	}while(t - t0 < seconds);
	return (double)n / (t - t0);
}

/* The same token through libjwt: it parses the PEM key on every jwt_encode_str. */
static double bench_libjwt(const char *pem_path, const char *kid, int es256, double seconds)
{
	FILE *f = fopen(pem_path, "rb");
	unsigned char pem[8192];
	size_t plen = f ? fread(pem, 1, sizeof(pem), f) : 0;
	if(f) fclose(f);
	if(plen == 0) return 0;
	long n = 0;
	double t0 = now_s(), t;
	do{
		for(int i = 0; i < 32; i++){
			jwt_t *j = NULL;
			time_t iat = time(NULL);
			if(jwt_new(&j) || jwt_add_header(j, "kid", kid) || jwt_add_grant_int(j, "iat", iat)
					|| jwt_add_grant_int(j, "exp", iat + 1200)
					|| jwt_add_grant(j, "aud", "https://akenza.io/devices/bench-device-0001")
					|| jwt_set_alg(j, es256 ? JWT_ALG_ES256 : JWT_ALG_RS256, pem, (int)plen)){
				fprintf(stderr, "libjwt setup failed\n");
				exit(1);
			}
			char *tok = jwt_encode_str(j);
			if(tok == NULL){
				fprintf(stderr, "libjwt encode failed\n");
				exit(1);
			}
			free(tok);
			jwt_free(j);
			n++;
		}
		t = now_s();
	}while(t - t0 < seconds);
	return (double)n / (t - t0);
}

enum loader { LOAD_OURS, LOAD_STORE, LOAD_PEM };

/* Loads one key through loader. Returns false on failure. */
static bool load_once(const char *path, enum loader how, const struct akz_key_opts *o)
{
	char err[512];
	if(how == LOAD_OURS){
		struct akz_key *k;
		if(akz_key_load(path, o, &k, err, sizeof(err))) return false;
		akz_key_unref(k);
		return true;
	}
	EVP_PKEY *pkey = NULL;
	if(how == LOAD_PEM){
		FILE *f = fopen(path, "rb");
		if(f == NULL) return false;
		pkey = PEM_read_PrivateKey(f, NULL, NULL, NULL);
		fclose(f);
	}else{
		OSSL_STORE_CTX *c = OSSL_STORE_open(path, NULL, NULL, NULL, NULL);
		while(c && pkey == NULL && !OSSL_STORE_eof(c)){
			OSSL_STORE_INFO *info = OSSL_STORE_load(c);
			if(info && OSSL_STORE_INFO_get_type(info) == OSSL_STORE_INFO_PKEY) pkey = OSSL_STORE_INFO_get1_PKEY(info);
			OSSL_STORE_INFO_free(info);
		}
		OSSL_STORE_close(c);
	}
	EVP_PKEY_free(pkey);
	return pkey != NULL;
}

/* Loads the key file for `seconds` (checks, kid and signing set-up included for ours: everything
 * a device's key costs at broker start). Returns loads per second. */
static double bench_load(const char *path, enum loader how, double seconds)
{
	struct akz_key_opts o = {.allow_group_readable = true};
	long n = 0;
	double t0 = now_s(), t;
	do{
		for(int i = 0; i < 16; i++){
			if(!load_once(path, how, &o)){
				fprintf(stderr, "loading %s failed\n", path);
				exit(1);
			}
			n++;
		}
		t = now_s();
	}while(t - t0 < seconds);
	return (double)n / (t - t0);
}

int main(int argc, char **argv)
{
	if(argc != 4 && argc != 5){
		fprintf(stderr, "usage: bench_jwt KEYFILE es256|rs256 SECONDS [PROVIDERS]\n"
				"With PROVIDERS (e.g. default,tpm2) the key is in a device: only akz_jwt_mint is measured.\n");
		return 2;
	}
	struct akz_key *key;
	char err[512];
	struct akz_key_opts o = {.allow_group_readable = true};
	if(argc == 5 && akz_keythread_configure(argv[4], NULL, err, sizeof(err))){
		fprintf(stderr, "%s\n", err);
		return 1;
	}
	if(akz_key_load(argv[1], &o, &key, err, sizeof(err))){
		fprintf(stderr, "%s\n", err);
		return 1;
	}
	double secs = atof(argv[3]);
	double ours = bench_ours(key, secs);
	if(argc == 5){
		printf("ours %.1f\n", ours);
		akz_key_unref(key);
		akz_keythread_cleanup();
		return 0;
	}
	double lj = bench_libjwt(argv[1], akz_key_kid(key), strcmp(argv[2], "es256") == 0, secs);
	double loads = bench_load(argv[1], LOAD_OURS, secs / 3);
	double store = bench_load(argv[1], LOAD_STORE, secs / 3);
	double pem = bench_load(argv[1], LOAD_PEM, secs / 3);
	printf("ours %.0f libjwt %.0f loads %.0f store %.0f pem %.0f\n", ours, lj, loads, store, pem);
	akz_key_unref(key);
	return 0;
}
