/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* cmd_registry.c - akenzactl passwd and check-registry. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <unistd.h>
#include <openssl/crypto.h>
#include "akenzactl.h"
#include "akz_passwd.h"
#include "akz_registry.h"
#include "akz_util.h"

int ctl_read_line(FILE *f, char *buf, size_t size)
{
	char *line = NULL;
	size_t cap = 0;
	ssize_t n = getline(&line, &cap, f);
	int rc = 0;
	if(n < 0){
		rc = -1;
	}else{
		while(n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) n--;
		if(memchr(line, '\0', (size_t)n)) rc = -2;       /* strlen would cut the secret short */
		else if((size_t)n >= size) rc = -3;
		else{
			memcpy(buf, line, (size_t)n);
			buf[n] = '\0';
		}
	}
	if(line) OPENSSL_clear_free(line, cap);
	return rc;
}

const char *ctl_read_line_error(int rc)
{
	return rc == -2 ? "it holds a NUL byte, which would cut it short" : rc == -3 ? "it is too long"
			: "nothing to read";
}

int ctl_read_secret(const char *prompt, char *buf, size_t size)
{
	struct termios old, quiet;
	bool tty = isatty(STDIN_FILENO) && tcgetattr(STDIN_FILENO, &old) == 0;
	if(tty){
		fputs(prompt, stderr);
		quiet = old;
		quiet.c_lflag &= ~(tcflag_t)ECHO;
		tcsetattr(STDIN_FILENO, TCSAFLUSH, &quiet);
	}
	int rc = ctl_read_line(stdin, buf, size);
	if(tty){
		tcsetattr(STDIN_FILENO, TCSAFLUSH, &old);
		fputc('\n', stderr);
	}
	return rc;
}

int cmd_passwd(int argc, char **argv)
{
	static const char help[] =
		"usage: akenzactl passwd [--iterations N]\n"
		"Reads a password (a prompt without echo on a terminal, else one line of standard input)\n"
		"and prints its hash for the registry's \"password\" field: PBKDF2-HMAC-SHA512 in\n"
		"mosquitto_passwd's $7$ format, 210000 iterations by default.\n";
	static const struct option lo[] = {
		{"iterations", required_argument, NULL, 'i'}, {"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
	long it = AKZ_PW_ITERATIONS_DEFAULT;
	int c;

	optind = 1;
	while((c = getopt_long(argc, argv, "i:h", lo, NULL)) != -1){
		switch(c){
		case 'i': {
			char *end;
			errno = 0;
			it = strtol(optarg, &end, 10);
			if(errno || *end || it < 1000 || it > AKZ_PW_ITERATIONS_MAX){
				ctl_error("--iterations: '%s' is not a number from 1000 to %d", optarg, AKZ_PW_ITERATIONS_MAX);
				return 2;
			}
			break;
		}
		case 'h': fputs(help, stdout); return 0;
		default: fputs(help, stderr); return 2;
		}
	}
	if(optind != argc){
		fputs(help, stderr);
		return 2;
	}
	char pw[1024], again[1024], err[256];
	int rrc = ctl_read_secret("Password: ", pw, sizeof(pw));
	if(rrc){
		ctl_error("no password on standard input%s%s", rrc == -1 ? "" : ": ", rrc == -1 ? "" : ctl_read_line_error(rrc));
		return 1;
	}
	if(isatty(STDIN_FILENO)){
		if(ctl_read_secret("Again: ", again, sizeof(again)) || strcmp(pw, again) != 0){
			OPENSSL_cleanse(pw, sizeof(pw));
			ctl_error("the passwords do not match");
			return 1;
		}
		OPENSSL_cleanse(again, sizeof(again));
	}
	char *hash = akz_pw_hash(pw, (int)it, err, sizeof(err));
	OPENSSL_cleanse(pw, sizeof(pw));
	if(hash == NULL){
		ctl_error("%s", err);
		return 1;
	}
	printf("%s\n", hash);
	free(hash);
	return 0;
}

/* Problems name what the file holds: escaped, so that a field name cannot write to the terminal. */
static void print_problem(void *ctx, const char *msg)
{
	(void)ctx;
	fprintf(stderr, "%s\n", akz_esc(msg));
}

static void print_warning(void *ctx, const char *msg)
{
	(void)ctx;
	fprintf(stderr, "warning: %s\n", akz_esc(msg));
}

int cmd_check_registry(int argc, char **argv)
{
	static const char help[] =
		"usage: akenzactl check-registry [--keystore DIR] [KEY OPTIONS] FILE\n"
		"Checks a device registry as the plugin would at start: JSON, fields, password hashes,\n"
		"duplicates, gateways, and every device key. Prints every problem; exits 1 if there is any.\n"
		"Warns (exit 0) about weak password hashes: $6$, or $7$ with fewer than 100000 iterations.\n"
		CTL_KEY_HELP;
	enum { OPT_KEYSTORE = CTL_OPT_FIRST_FREE };
	static const struct option lo[] = {
		{"keystore", required_argument, NULL, OPT_KEYSTORE},
		CTL_KEY_LONGOPTS,
		{"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
	struct akz_key_opts ko = {0};
	const char *keystore = NULL;
	int c;

	optind = 1;
	while((c = getopt_long(argc, argv, "h", lo, NULL)) != -1){
		switch(c){
		case OPT_KEYSTORE: keystore = optarg; break;
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
	struct akz_registry *reg;
	if(akz_registry_load(argv[optind], keystore, &ko, print_problem, NULL, &reg)){
		ctl_error("%s has problems (above)", argv[optind]);
		return 1;
	}
	akz_registry_weak_hashes(reg, argv[optind], print_warning, NULL);
	size_t enabled = 0;
	for(size_t i = 0; i < akz_registry_device_count(reg); i++){
		if(akz_registry_device_at(reg, i)->enabled) enabled++;
	}
	printf("%s: OK: %zu devices (%zu enabled), %zu gateways\n", argv[optind],
			akz_registry_device_count(reg), enabled, akz_registry_gateway_count(reg));
	akz_registry_free(reg);
	return 0;
}
