/* bench_jwt.c - tokens per second from akz_jwt_mint and from libjwt 1.x, same key, same claims, one core. */
#include <jwt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "akz_jwt.h"
#include "akz_keystore.h"

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Mints for `seconds` and returns tokens per second. */
static double bench_ours(const struct akz_key *key, double seconds)
{
	char err[256];
	long n = 0;
	double t0 = now_s(), t;
	do{
		for(int i = 0; i < 32; i++){
			char *tok = akz_jwt_mint(key, "bench-device-0001", time(NULL), 1200, err, sizeof(err));
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

int main(int argc, char **argv)
{
	if(argc != 4){
		fprintf(stderr, "usage: bench_jwt KEYFILE es256|rs256 SECONDS\n");
		return 2;
	}
	struct akz_key *key;
	char err[512];
	struct akz_key_opts o = {.allow_group_readable = true};
	if(akz_key_load(argv[1], &o, &key, err, sizeof(err))){
		fprintf(stderr, "%s\n", err);
		return 1;
	}
	double secs = atof(argv[3]);
	double ours = bench_ours(key, secs);
	double lj = bench_libjwt(argv[1], akz_key_kid(key), strcmp(argv[2], "es256") == 0, secs);
	printf("ours %.0f libjwt %.0f\n", ours, lj);
	akz_key_unref(key);
	return 0;
}
