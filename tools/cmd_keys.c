/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* cmd_keys.c - akenzactl keygen, fingerprint and token. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "akenzactl.h"
#include "akz_jwt.h"
#include "akz_keystore.h"
#include "akz_keythread.h"
#include "akz_x509.h"

enum { OPT_LIFETIME = CTL_OPT_FIRST_FREE, OPT_AUDIENCE, OPT_CERT, OPT_DAYS };

/* Refuses device ids that would escape DIR when used as a file name. */
static int check_id_as_filename(const char *id)
{
	if(id[0] == '\0' || strchr(id, '/') || strcmp(id, ".") == 0 || strcmp(id, "..") == 0){
		ctl_error("device id '%s' cannot be used as a file name", id);
		return -1;
	}
	return 0;
}

/* Creates path (0644, never over an existing file) holding text. Returns 0, or -1 after printing
 * why (nothing left behind then). */
static int write_new_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	if(fd < 0){
		ctl_error("%s: %s", path, strerror(errno));
		return -1;
	}
	size_t len = strlen(text);
	ssize_t n = write(fd, text, len);
	int rc = (n == (ssize_t)len && fsync(fd) == 0) ? 0 : -1;
	if(rc) ctl_error("%s: %s", path, n < 0 || n == (ssize_t)len ? strerror(errno) : "short write");
	if(close(fd) != 0 && rc == 0){
		ctl_error("%s: %s", path, strerror(errno));
		rc = -1;
	}
	if(rc) unlink(path);
	return rc;
}

int cmd_keygen(int argc, char **argv)
{
	static const char help[] =
		"usage: akenzactl keygen --device ID --type ec|rsa [--bits 2048|3072|4096] --out DIR\n"
		"                        [--cert [--days N]] [--store file|tpm2] [--providers LIST]\n"
		"                        [--openssl-conf FILE]\n"
		"Writes DIR/ID.pem (private key, mode 0600: keep it on the gateway) and DIR/ID.pub.pem\n"
		"(upload it to the device in akenza) and prints the kid. With --cert also DIR/ID.cert.pem, a\n"
		"self-signed certificate of the key with CN=ID, valid N days (default 3650), for akenza's\n"
		"RSA256_X509_PEM / EC256_X509_PEM credentials. Existing files are never overwritten.\n"
		"--store tpm2 makes the key inside the TPM (through OpenSSL's tpm2 provider): DIR/ID.pem is\n"
		"then the TPM's key blob, useless without that TPM. Default providers: default,tpm2.\n";
	static const struct option lo[] = {
		{"device", required_argument, NULL, 'd'}, {"type", required_argument, NULL, 't'},
		{"bits", required_argument, NULL, 'b'}, {"out", required_argument, NULL, 'o'},
		{"cert", no_argument, NULL, OPT_CERT}, {"days", required_argument, NULL, OPT_DAYS},
		{"store", required_argument, NULL, 's'}, CTL_KEY_LONGOPTS,
		{"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
	struct akz_key_opts ko = {0};
	const char *id = NULL, *type = NULL, *dir = NULL, *store = "file";
	long bits = 2048, days = AKZ_X509_DAYS_DEFAULT;
	bool cert = false, days_given = false, providers_set = false;
	int c;

	optind = 1;
	while((c = getopt_long(argc, argv, "d:t:b:o:h", lo, NULL)) != -1){
		switch(c){
		case 'd': id = optarg; break;
		case 't': type = optarg; break;
		case 'b': if(ctl_parse_long("--bits", optarg, 2048, 4096, &bits)) return 2; break;
		case 'o': dir = optarg; break;
		case 's': store = optarg; break;
		case OPT_CERT: cert = true; break;
		case OPT_DAYS:
			if(ctl_parse_long("--days", optarg, 1, AKZ_X509_DAYS_MAX, &days)) return 2;
			days_given = true;
			break;
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
	if(days_given && !cert){
		ctl_error("--days applies to --cert only");
		return 2;
	}
	if(check_id_as_filename(id)) return 2;
	enum akz_alg alg = strcmp(type, "ec") == 0 ? AKZ_ALG_ES256 : strcmp(type, "rsa") == 0 ? AKZ_ALG_RS256 : AKZ_ALG_NONE;
	if(alg == AKZ_ALG_NONE){
		ctl_error("--type: '%s' is not ec or rsa", type);
		return 2;
	}
	char err[512], priv[PATH_MAX], pub[PATH_MAX], crt[PATH_MAX];
	if(snprintf(priv, sizeof(priv), "%s/%s.pem", dir, id) >= (int)sizeof(priv)
			|| snprintf(pub, sizeof(pub), "%s/%s.pub.pem", dir, id) >= (int)sizeof(pub)
			|| snprintf(crt, sizeof(crt), "%s/%s.cert.pem", dir, id) >= (int)sizeof(crt)){
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
	/* The certificate is made before any file is written, and its file claimed first: a
	 * failure leaves nothing behind. */
	char *pem = cert ? akz_x509_self_signed(key, id, (int)days, err, sizeof(err)) : NULL;
	int rc = 1;
	if(cert && pem == NULL){
		ctl_error("%s", err);
	}else if(cert && access(crt, F_OK) == 0){
		ctl_error("%s: %s", crt, strerror(EEXIST));
	}else if(akz_key_write(key, priv, pub, err, sizeof(err))){
		/* It may have written the private key before it found the public one in the way. */
		if(strstr(err, pub)) unlink(priv);
		ctl_error("%s", err);
	}else if(cert && write_new_file(crt, pem)){
		unlink(priv);
		unlink(pub);
	}else{
		printf("%s\n", akz_key_kid(key));
		rc = 0;
	}
	free(pem);
	akz_key_unref(key);
	return rc;
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
		"usage: akenzactl token --device ID --key FILE|URI [--lifetime SECONDS] [--audience HOST]\n"
		"                       [KEY OPTIONS]\n"
		"Prints a fresh JWT for device ID signed with FILE (RS256 or ES256 by the key's type),\n"
		"valid for SECONDS (60 to 86400, default 1200). Its aud is https://HOST/devices/ID, HOST\n"
		"akenza.io unless --audience names a private cloud's (as plugin_opt_audience).\n" CTL_KEY_HELP;
	static const struct option lo[] = {
		{"device", required_argument, NULL, 'd'}, {"key", required_argument, NULL, 'k'},
		{"lifetime", required_argument, NULL, OPT_LIFETIME},
		{"audience", required_argument, NULL, OPT_AUDIENCE},
		CTL_KEY_LONGOPTS,
		{"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
	struct akz_key_opts ko = {0};
	const char *id = NULL, *keyfile = NULL, *audience = AKZ_AUDIENCE_DEFAULT;
	long lifetime = AKZ_JWT_LIFETIME_DEFAULT;
	int c;

	optind = 1;
	while((c = getopt_long(argc, argv, "d:k:h", lo, NULL)) != -1){
		switch(c){
		case 'd': id = optarg; break;
		case 'k': keyfile = optarg; break;
		case OPT_LIFETIME:
			if(ctl_parse_long("--lifetime", optarg, AKZ_JWT_LIFETIME_MIN, AKZ_JWT_LIFETIME_MAX, &lifetime)) return 2;
			break;
		case OPT_AUDIENCE: {
			const char *why = akz_jwt_bad_audience(optarg);
			if(why){
				ctl_error("--audience: '%s' %s", optarg, why);
				return 2;
			}
			audience = optarg;
			break;
		}
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
	char *tok = akz_jwt_mint(key, audience, id, time(NULL), lifetime, err, sizeof(err));
	akz_key_unref(key);
	if(tok == NULL){
		ctl_error("%s", err);
		return 1;
	}
	printf("%s\n", tok);
	free(tok);
	return 0;
}
