/* cmd_keys.c - akenzactl keygen, fingerprint and token. */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "akenzactl.h"
#include "akz_jwt.h"
#include "akz_keystore.h"
#include "akz_keythread.h"

enum { OPT_LIFETIME = CTL_OPT_FIRST_FREE };

/* Parses a whole number in [lo, hi]. Returns 0, or -1 after printing why. */
static int parse_long(const char *what, const char *s, long lo, long hi, long *out)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if(errno || end == s || *end || v < lo || v > hi){
		ctl_error("%s: '%s' is not a whole number from %ld to %ld", what, s, lo, hi);
		return -1;
	}
	*out = v;
	return 0;
}

/* Refuses device ids that would escape DIR when used as a file name. */
static int check_id_as_filename(const char *id)
{
	if(id[0] == '\0' || strchr(id, '/') || strcmp(id, ".") == 0 || strcmp(id, "..") == 0){
		ctl_error("device id '%s' cannot be used as a file name", id);
		return -1;
	}
	return 0;
}

int cmd_keygen(int argc, char **argv)
{
	static const char help[] =
		"usage: akenzactl keygen --device ID --type ec|rsa [--bits 2048|3072|4096] --out DIR\n"
		"                        [--store file|tpm2] [--providers LIST] [--openssl-conf FILE]\n"
		"Writes DIR/ID.pem (private key, mode 0600: keep it on the gateway) and DIR/ID.pub.pem\n"
		"(upload it to the device in akenza) and prints the kid. Existing files are never overwritten.\n"
		"--store tpm2 makes the key inside the TPM (through OpenSSL's tpm2 provider): DIR/ID.pem is\n"
		"then the TPM's key blob, useless without that TPM. Default providers: default,tpm2.\n";
	static const struct option lo[] = {
		{"device", required_argument, NULL, 'd'}, {"type", required_argument, NULL, 't'},
		{"bits", required_argument, NULL, 'b'}, {"out", required_argument, NULL, 'o'},
		{"store", required_argument, NULL, 's'}, CTL_KEY_LONGOPTS,
		{"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
	struct akz_key_opts ko = {0};
	const char *id = NULL, *type = NULL, *dir = NULL, *store = "file";
	bool providers_set = false;
	long bits = 2048;
	int c;

	optind = 1;
	while((c = getopt_long(argc, argv, "d:t:b:o:h", lo, NULL)) != -1){
		switch(c){
		case 'd': id = optarg; break;
		case 't': type = optarg; break;
		case 'b': if(parse_long("--bits", optarg, 2048, 4096, &bits)) return 2; break;
		case 'o': dir = optarg; break;
		case 's': store = optarg; break;
		case 'h': fputs(help, stdout); return 0;
		default:
			if(ctl_key_option(c, optarg, &ko)){
				providers_set = true;
				break;
			}
			fputs(help, stderr);
			return 2;
		}
	}
	if(id == NULL || type == NULL || dir == NULL || optind != argc){
		ctl_error("keygen needs --device, --type and --out");
		fputs(help, stderr);
		return 2;
	}
	if(check_id_as_filename(id)) return 2;
	enum akz_alg alg = strcmp(type, "ec") == 0 ? AKZ_ALG_ES256 : strcmp(type, "rsa") == 0 ? AKZ_ALG_RS256 : AKZ_ALG_NONE;
	if(alg == AKZ_ALG_NONE){
		ctl_error("--type: '%s' is not ec or rsa", type);
		return 2;
	}
	char err[512], priv[PATH_MAX], pub[PATH_MAX];
	if(snprintf(priv, sizeof(priv), "%s/%s.pem", dir, id) >= (int)sizeof(priv)
			|| snprintf(pub, sizeof(pub), "%s/%s.pub.pem", dir, id) >= (int)sizeof(pub)){
		ctl_error("path too long");
		return 1;
	}
	bool in_file = strcmp(store, "file") == 0;
	if(!in_file && strcmp(store, "tpm2") != 0){
		ctl_error("--store: '%s' is not file or tpm2", store);
		return 2;
	}
	/* A TPM key needs the tpm2 provider (and the default one for everything else). */
	if(!in_file && !providers_set && akz_keythread_configure("default,tpm2", NULL, err, sizeof(err))){
		ctl_error("%s", err);
		return 1;
	}
	struct akz_key *key;
	if(in_file ? akz_key_generate(alg, (int)bits, &key, err, sizeof(err))
			: akz_key_generate_in(store, alg, (int)bits, &key, err, sizeof(err))){
		ctl_error("%s", err);
		return 1;
	}
	int rc = akz_key_write(key, priv, pub, err, sizeof(err));
	if(rc == 0){
		printf("%s\n", akz_key_kid(key));
	}else{
		ctl_error("%s", err);
	}
	akz_key_unref(key);
	return rc ? 1 : 0;
}

int cmd_fingerprint(int argc, char **argv)
{
	static const char help[] =
		"usage: akenzactl fingerprint [KEY OPTIONS] FILE|URI\n"
		"Prints the kid akenza expects for the key in FILE (private or public key, PEM, or a TPM\n"
		"key blob) or at URI (handle:0x81000001): the lowercase hex SHA-256 of its\n"
		"SubjectPublicKeyInfo DER, EC points uncompressed.\n" CTL_KEY_HELP;
	static const struct option lo[] = {
		CTL_KEY_LONGOPTS,
		{"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
	struct akz_key_opts ko = {0};
	int c;

	optind = 1;
	while((c = getopt_long(argc, argv, "h", lo, NULL)) != -1){
		switch(c){
		case 'h': fputs(help, stdout); return 0;
		default:
			if(ctl_key_option(c, optarg, &ko)) break;
			fputs(help, stderr);
			return 2;
		}
	}
	if(optind != argc - 1){
		fputs(help, stderr);
		return 2;
	}
	/* A public key file is not secret: its permissions do not matter. */
	char kid[AKZ_KID_LEN], err[512];
	if(akz_file_kid(argv[optind], &ko, kid, err, sizeof(err))){
		ctl_error("%s", err);
		return 1;
	}
	printf("%s\n", kid);
	return 0;
}

int cmd_token(int argc, char **argv)
{
	static const char help[] =
		"usage: akenzactl token --device ID --key FILE|URI [--lifetime SECONDS] [KEY OPTIONS]\n"
		"Prints a fresh JWT for device ID signed with FILE (RS256 or ES256 by the key's type),\n"
		"valid for SECONDS (60 to 86400, default 1200).\n" CTL_KEY_HELP;
	static const struct option lo[] = {
		{"device", required_argument, NULL, 'd'}, {"key", required_argument, NULL, 'k'},
		{"lifetime", required_argument, NULL, OPT_LIFETIME},
		CTL_KEY_LONGOPTS,
		{"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
	struct akz_key_opts ko = {0};
	const char *id = NULL, *keyfile = NULL;
	long lifetime = AKZ_JWT_LIFETIME_DEFAULT;
	int c;

	optind = 1;
	while((c = getopt_long(argc, argv, "d:k:h", lo, NULL)) != -1){
		switch(c){
		case 'd': id = optarg; break;
		case 'k': keyfile = optarg; break;
		case OPT_LIFETIME:
			if(parse_long("--lifetime", optarg, AKZ_JWT_LIFETIME_MIN, AKZ_JWT_LIFETIME_MAX, &lifetime)) return 2;
			break;
		case 'h': fputs(help, stdout); return 0;
		default:
			if(ctl_key_option(c, optarg, &ko)) break;
			fputs(help, stderr);
			return 2;
		}
	}
	if(id == NULL || keyfile == NULL || optind != argc){
		ctl_error("token needs --device and --key");
		fputs(help, stderr);
		return 2;
	}
	struct akz_key *key;
	char err[512];
	if(akz_key_load(keyfile, &ko, &key, err, sizeof(err))){
		ctl_error("%s", err);
		return 1;
	}
	char *tok = akz_jwt_mint(key, id, time(NULL), lifetime, err, sizeof(err));
	akz_key_unref(key);
	if(tok == NULL){
		ctl_error("%s", err);
		return 1;
	}
	printf("%s\n", tok);
	free(tok);
	return 0;
}
