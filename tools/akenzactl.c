/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akenzactl.c - command-line tool for mosquitto-akenza: keys, tokens, passwords, registry checks,
 * the control API of a running broker, and akenza's REST API. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "akenzactl.h"
#include "akz_keythread.h"

static const struct command {
	const char *name;
	int (*run)(int argc, char **argv);
	const char *summary;
} commands[] = {
	{"keygen", cmd_keygen, "make a device key pair (private key stays here, public key goes to akenza)"},
	{"fingerprint", cmd_fingerprint, "print the kid (SHA-256 of the public key) of a key file"},
	{"token", cmd_token, "mint a device JWT as the plugin would"},
	{"passwd", cmd_passwd, "hash a local password for the device registry"},
	{"check-registry", cmd_check_registry, "validate a device registry and its keys"},
	{"device", cmd_device, "list, create, change, rotate keys of devices in a running broker (control API)"},
	{"gateway", cmd_gateway, "list, create, change gateways in a running broker (control API)"},
	{"status", cmd_status, "totals of a running broker's plugin (control API)"},
	{"akenza", cmd_akenza, "register devices and their keys with akenza's REST API; import a fleet from CSV"},
};
#define NCOMMANDS (sizeof(commands)/sizeof(commands[0]))

void ctl_error(const char *fmt, ...)
{
	va_list ap;
	fputs("akenzactl: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

int ctl_parse_long(const char *what, const char *s, long lo, long hi, long *out)
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

bool ctl_wants_help(int argc, char **argv)
{
	for(int i = 1; i < argc; i++){
		if(strcmp(argv[i], "--") == 0) break;
		if(strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) return true;
	}
	return false;
}

bool ctl_key_option(int c, const char *arg, struct akz_key_opts *ko)
{
	static const char *providers, *conf;
	char err[512];

	switch(c){
	case CTL_OPT_PASS: ko->passphrase_file = arg; return true;
	case CTL_OPT_READABLE: ko->allow_group_readable = true; return true;
	case CTL_OPT_PROVIDERS:
	case CTL_OPT_OSSL_CONF:
		if(c == CTL_OPT_PROVIDERS) providers = arg;
		else conf = arg;
		if(akz_keythread_configure(providers, conf, err, sizeof(err))){
			ctl_error("%s", err);
			exit(2);
		}
		return true;
	default: return false;
	}
}

static void usage(FILE *out)
{
	fputs("usage: akenzactl COMMAND [OPTIONS]   (akenzactl COMMAND --help for its options)\n\n", out);
	for(size_t i = 0; i < NCOMMANDS; i++){
		fprintf(out, "  %-15s %s\n", commands[i].name, commands[i].summary);
	}
}

int main(int argc, char **argv)
{
	if(argc < 2){
		usage(stderr);
		return 2;
	}
	if(strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "help") == 0){
		usage(stdout);
		return 0;
	}
	for(size_t i = 0; i < NCOMMANDS; i++){
		if(strcmp(argv[1], commands[i].name) == 0){
			int rc = commands[i].run(argc - 1, argv + 1);
			akz_keythread_cleanup();
			return rc;
		}
	}
	ctl_error("unknown command '%s'", argv[1]);
	usage(stderr);
	return 2;
}
