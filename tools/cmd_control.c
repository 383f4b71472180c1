/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* cmd_control.c - akenzactl device|gateway|status: the control API ($CONTROL/akenza/v1) of a
 * running broker, as mosquitto_ctrl dynsec is for dynamic-security. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>
#include <cJSON.h>
#include <openssl/crypto.h>
#include "akenzactl.h"

/* Options of a control command; bit flags say which ones a subcommand takes. */
enum {
	O_USERNAME = 1 << 0, O_PASSWORD = 1 << 1, O_TYPE = 1 << 2, O_BITS = 1 << 3, O_KEYURI = 1 << 4,
	O_ENABLE = 1 << 5, O_DISABLE = 1 << 6, O_DEVICES = 1 << 7, O_REGISTER = 1 << 8, O_STORE = 1 << 9,
};

enum { L_CAFILE = CTL_OPT_FIRST_FREE, L_CAPATH, L_CERT, L_KEY, L_USERNAME, L_PASSWORD, L_TYPE, L_BITS,
	L_KEYURI, L_ENABLE, L_DISABLE, L_DEVICES, L_REGISTER, L_REGISTER_CERT, L_STORE, L_HELP, L_ADMIN_PW_FILE };

static const struct option longopts[] = {
	{"cafile", required_argument, NULL, L_CAFILE}, {"capath", required_argument, NULL, L_CAPATH},
	{"cert", required_argument, NULL, L_CERT}, {"key", required_argument, NULL, L_KEY},
	{"username", required_argument, NULL, L_USERNAME}, {"password", required_argument, NULL, L_PASSWORD},
	{"type", required_argument, NULL, L_TYPE}, {"bits", required_argument, NULL, L_BITS},
	{"key-uri", required_argument, NULL, L_KEYURI}, {"enable", no_argument, NULL, L_ENABLE},
	{"disable", no_argument, NULL, L_DISABLE}, {"disabled", no_argument, NULL, L_DISABLE},
	{"devices", required_argument, NULL, L_DEVICES}, {"help", no_argument, NULL, L_HELP},
	{"admin-password-file", required_argument, NULL, L_ADMIN_PW_FILE},
	{"register", no_argument, NULL, L_REGISTER}, {"register-cert", no_argument, NULL, L_REGISTER_CERT},
	{"store", required_argument, NULL, L_STORE},
	CTL_API_LONGOPTS,
	{NULL, 0, NULL, 0}};

static const char conn_help[] =
	"connection options (every command):\n"
	"            -h HOST (localhost) -p PORT (1883, 8883 with TLS) -u USER\n"
	"            --admin-password-file FILE (its first line) | env " CTL_ADMIN_PW_ENV " | -P PASSWORD\n"
	"            --cafile FILE | --capath DIR (TLS; the server is always verified) --cert FILE --key FILE\n"
	"            -W SECONDS (wait for the answer, default 10)\n"
	"-P puts the admin password on the command line, where every local user can read it (ps,\n"
	"/proc/PID/cmdline) and the shell history keeps it: prefer the file (chmod 600) or the\n"
	"environment variable, which only the same user and root can read.\n"
	"The user needs the broker's permission to publish to $CONTROL/akenza/v1 and to subscribe to\n"
	"$CONTROL/akenza/v1/response (acl_file or dynamic-security).\n";

/* One subcommand: its request name, positional argument, options, and help. */
struct sub {
	const char *name;
	const char *command;     /* control API command */
	const char *arg;         /* "id", "username" or NULL */
	unsigned opts;
	const char *usage;
};

static const struct sub device_subs[] = {
	{"list", "listDevices", NULL, 0, "device list\n  Lists the devices: id, username, enabled, kid.\n"},
	{"get", "getDevice", "id", 0, "device get ID\n  Shows a device, its keys and its live bridge state.\n"},
	{"create", "createDevice", "id", O_USERNAME | O_PASSWORD | O_TYPE | O_BITS | O_KEYURI | O_DISABLE | O_STORE,
		"device create ID [--username U] [--password P] (--type ec|rsa [--bits 2048|3072|4096]\n"
		"                 [--store file|tpm2] | --key-uri URI) [--disabled]\n"
		"  Creates a device. Without --password the password is read from standard input (no echo on a\n"
		"  terminal). --type makes a key pair in the broker's key store and prints the public key to upload\n"
		"  to akenza (--store tpm2: inside the broker's TPM, which it never leaves); --key-uri uses an\n"
		"  existing key (path or OSSL_STORE URI).\n"},
	{"modify", "modifyDevice", "id", O_USERNAME | O_PASSWORD | O_KEYURI | O_ENABLE | O_DISABLE,
		"device modify ID [--username U] [--password P] [--key-uri URI] [--enable|--disable]\n"
		"  Changes a device. A new generated key goes through rotate-key and commit-key.\n"},
	{"enable", "enableDevice", "id", 0, "device enable ID\n"},
	{"disable", "disableDevice", "id", 0, "device disable ID\n  Its local clients are disconnected and its upstream connection closed.\n"},
	{"delete", "deleteDevice", "id", 0, "device delete ID\n  Removes the device from the registry; its key files stay.\n"},
	{"rotate-key", "rotateKey", "id", O_TYPE | O_BITS | O_REGISTER | O_STORE,
		"device rotate-key ID [--type ec|rsa] [--bits N] [--store file|tpm2]\n"
		"                     [--register|--register-cert [API options]]\n"
		"  Makes a pending key (ID.next.pem) and prints its public key: upload it to akenza, then commit-key.\n"
		"  The current key stays in use until then. --register uploads it to akenza through akenza's REST\n"
		"  API (--register-cert: as its self-signed certificate); see akenzactl akenza --help.\n"},
	{"commit-key", "commitKey", "id", 0, "device commit-key ID\n  The pending key becomes the device's key; the bridge reconnects with it.\n"},
	{"reconnect", "reconnectDevice", "id", 0, "device reconnect ID\n  Drops the upstream connection and connects again now.\n"},
};

static const struct sub gateway_subs[] = {
	{"list", "listGateways", NULL, 0, "gateway list\n"},
	{"get", "getGateway", "username", 0, "gateway get USERNAME\n"},
	{"create", "createGateway", "username", O_PASSWORD | O_DEVICES,
		"gateway create USERNAME [--password P] --devices ID[,ID...]|'*'\n"
		"  Without --password the password is read from standard input.\n"},
	{"modify", "modifyGateway", "username", O_PASSWORD | O_DEVICES,
		"gateway modify USERNAME [--password P] [--devices ID[,ID...]|'*']\n"},
	{"delete", "deleteGateway", "username", 0, "gateway delete USERNAME\n"},
};

static const struct sub status_sub = {"status", "getStatus", NULL, 0,
	"status\n  Version, device and gateway counts, upstream totals.\n"};

/* What the command line said. */
struct args {
	struct ctl_conn conn;
	unsigned given;
	const char *username, *password, *type, *keyuri, *devices, *store;
	const char *admin_pw_file;
	long bits;
	char admin_pw[1024];    /* read from the file or the environment; cleansed after use */
	bool reg, reg_cert;          /* rotate-key --register / --register-cert */
	bool api_given;
	struct ctl_api_args api;
};

int ctl_admin_password(struct ctl_conn *conn, const char *file, char *buf, size_t size)
{
	if(file && conn->password){
		ctl_error("-P and --admin-password-file exclude each other");
		return 2;
	}
	if(file){
		FILE *f = fopen(file, "r");
		struct stat sb;
		if(f == NULL){
			ctl_error("%s: %s", file, strerror(errno));
			return 2;
		}
		/* A pipe (--admin-password-file <(pass show broker)) is fine; a file others read is not. */
		if(fstat(fileno(f), &sb) == 0 && S_ISREG(sb.st_mode) && (sb.st_mode & 077)){
			ctl_error("%s: mode %04o: group or others can read it; chmod 600 it", file,
					(unsigned)(sb.st_mode & 07777));
			fclose(f);
			return 2;
		}
		int rc = ctl_read_line(f, buf, size);
		fclose(f);
		if(rc){
			ctl_error("%s: no admin password on its first line: %s", file, ctl_read_line_error(rc));
			return 2;
		}
		conn->password = buf;
	}else if(conn->password == NULL && getenv(CTL_ADMIN_PW_ENV)){
		if(snprintf(buf, size, "%s", getenv(CTL_ADMIN_PW_ENV)) >= (int)size){
			ctl_error("%s: too long", CTL_ADMIN_PW_ENV);
			return 2;
		}
		conn->password = buf;
	}
	return 0;
}

static void print_sub_help(FILE *out, const char *group, const struct sub *s)
{
	(void)group;   /* the usage text names it */
	fprintf(out, "usage: akenzactl %s\n", s->usage);
	fputs(conn_help, out);
	if(s->opts & O_REGISTER) fputs(ctl_api_help, out);
}

static void print_group_help(FILE *out, const char *group, const struct sub *subs, size_t n)
{
	fprintf(out, "usage: akenzactl %s COMMAND [ARGS] [connection]   (akenzactl %s COMMAND --help)\n\n", group, group);
	for(size_t i = 0; i < n; i++){
		fprintf(out, "  akenzactl %.*s\n", (int)strcspn(subs[i].usage, "\n"), subs[i].usage);
	}
	fputc('\n', out);
	fputs(conn_help, out);
}

/* Parses options (argv[0] is the subcommand) and the positional argument. Returns 0, 1 for
 * --help (printed), or 2 after a usage error (printed). */
static int parse_args(int argc, char **argv, const char *group, const struct sub *s, struct args *a,
		const char **positional)
{
	int c;
	long v;
	optind = 1;
	opterr = 1;
	a->conn.timeout_s = 10;
	while((c = getopt_long(argc, argv, "h:p:u:P:W:", longopts, NULL)) != -1){
		unsigned flag = 0;
		switch(c){
		case 'h': a->conn.host = optarg; break;
		case 'p':
			if(ctl_parse_long("-p", optarg, 1, 65535, &v)) return 2;
			a->conn.port = (int)v;
			break;
		case 'u': a->conn.user = optarg; break;
		case 'P': a->conn.password = optarg; break;
		case 'W':
			if(ctl_parse_long("-W", optarg, 1, 3600, &v)) return 2;
			a->conn.timeout_s = (int)v;
			break;
		case L_ADMIN_PW_FILE: a->admin_pw_file = optarg; break;
		case L_CAFILE: a->conn.cafile = optarg; break;
		case L_CAPATH: a->conn.capath = optarg; break;
		case L_CERT: a->conn.cert = optarg; break;
		case L_KEY: a->conn.key = optarg; break;
		case L_USERNAME: a->username = optarg; flag = O_USERNAME; break;
		case L_PASSWORD: a->password = optarg; flag = O_PASSWORD; break;
		case L_TYPE: a->type = optarg; flag = O_TYPE; break;
		case L_BITS:
			if(ctl_parse_long("--bits", optarg, 2048, 4096, &a->bits)) return 2;
			flag = O_BITS;
			break;
		case L_KEYURI: a->keyuri = optarg; flag = O_KEYURI; break;
		case L_STORE: a->store = optarg; flag = O_STORE; break;
		case L_ENABLE: flag = O_ENABLE; break;
		case L_DISABLE: flag = O_DISABLE; break;
		case L_DEVICES: a->devices = optarg; flag = O_DEVICES; break;
		case L_REGISTER: a->reg = true; flag = O_REGISTER; break;
		case L_REGISTER_CERT: a->reg = a->reg_cert = true; flag = O_REGISTER; break;
		case L_HELP:
			print_sub_help(stdout, group, s);
			return 1;
		default: {
			int api = ctl_api_option(c, optarg, &a->api);
			if(api < 0) return 2;
			if(api == 0){
				print_sub_help(stderr, group, s);
				return 2;
			}
			a->api_given = true;
			flag = O_REGISTER;
			break;
		}
		}
		if(flag && !(s->opts & flag)){
			const char *name = "?";
			for(const struct option *o = longopts; o->name; o++) if(o->val == c) name = o->name;
			ctl_error("%s%s%s: option '--%s' does not apply", group ? group : "", group ? " " : "", s->name, name);
			return 2;
		}
		a->given |= flag;
	}
	int want = s->arg ? 1 : 0;
	if(argc - optind != want){
		ctl_error("%s%s%s takes %s", group ? group : "", group ? " " : "", s->name,
				s->arg ? (strcmp(s->arg, "id") == 0 ? "one device ID" : "one USERNAME") : "no argument");
		print_sub_help(stderr, group, s);
		return 2;
	}
	*positional = want ? argv[optind] : NULL;
	if((a->given & O_ENABLE) && (a->given & O_DISABLE)){
		ctl_error("--enable and --disable exclude each other");
		return 2;
	}
	if(a->api_given && !a->reg){
		ctl_error("akenza's API options go with --register");
		return 2;
	}
	return ctl_admin_password(&a->conn, a->admin_pw_file, a->admin_pw, sizeof(a->admin_pw));
}

/* "a,b,c" or "*" as a JSON array. NULL when out of memory. */
static cJSON *device_list(const char *text)
{
	cJSON *arr = cJSON_CreateArray();
	const char *p = text;
	while(arr && *p){
		size_t n = strcspn(p, ",");
		char *item = strndup(p, n);
		if(item == NULL || (n > 0 && !cJSON_AddItemToArray(arr, cJSON_CreateString(item)))){
			free(item);
			cJSON_Delete(arr);
			return NULL;
		}
		free(item);
		p += n;
		if(*p == ',') p++;
	}
	return arr;
}

/* Builds the command object from the arguments. Returns it, or NULL after printing why. */
static cJSON *build_command(const struct sub *s, const struct args *a, const char *positional, char *pwbuf,
		size_t pwlen)
{
	cJSON *cmd = cJSON_CreateObject();
	bool ok = cmd && cJSON_AddStringToObject(cmd, "command", s->command);
	if(ok && positional) ok = cJSON_AddStringToObject(cmd, s->arg, positional) != NULL;
	if(ok && a->username) ok = cJSON_AddStringToObject(cmd, "username", a->username) != NULL;
	const char *password = a->password;
	/* create needs a password: read it rather than put it on the command line (ps shows those). */
	if(ok && password == NULL && (s->opts & O_PASSWORD) && strncmp(s->command, "create", 6) == 0){
		int rrc = ctl_read_secret("Password: ", pwbuf, pwlen);
		if(rrc || pwbuf[0] == '\0'){
			ctl_error("no password given (--password or standard input)%s%s", rrc < -1 ? ": " : "",
					rrc < -1 ? ctl_read_line_error(rrc) : "");
			cJSON_Delete(cmd);
			return NULL;
		}
		if(isatty(STDIN_FILENO)){
			/* Typed blind: ask twice, as mosquitto_passwd does. */
			char again[1024];
			bool same = ctl_read_secret("Again: ", again, sizeof(again)) == 0 && strcmp(again, pwbuf) == 0;
			OPENSSL_cleanse(again, sizeof(again));
			if(!same){
				ctl_error("the passwords do not match");
				cJSON_Delete(cmd);
				return NULL;
			}
		}
		password = pwbuf;
	}
	if(ok && password) ok = cJSON_AddStringToObject(cmd, "password", password) != NULL;
	if(ok && (a->given & (O_ENABLE | O_DISABLE))){
		ok = cJSON_AddBoolToObject(cmd, "enabled", (a->given & O_ENABLE) != 0) != NULL;
	}
	if(ok && a->devices){
		cJSON *devs = device_list(a->devices);
		ok = devs && cJSON_AddItemToObject(cmd, "devices", devs);
		if(!ok) cJSON_Delete(devs);
	}
	if(ok && strcmp(s->command, "rotateKey") == 0){
		if(a->type) ok = cJSON_AddStringToObject(cmd, "type", a->type) != NULL;
		if(ok && (a->given & O_BITS)) ok = cJSON_AddNumberToObject(cmd, "bits", (double)a->bits) != NULL;
		if(ok && a->store) ok = cJSON_AddStringToObject(cmd, "store", a->store) != NULL;
	}else if(ok && (a->type || a->keyuri)){
		if(a->type && a->keyuri){
			ctl_error("--type and --key-uri exclude each other");
			cJSON_Delete(cmd);
			return NULL;
		}
		cJSON *key = cJSON_AddObjectToObject(cmd, "key");
		ok = key != NULL;
		if(ok && a->keyuri) ok = cJSON_AddStringToObject(key, "uri", a->keyuri) != NULL;
		if(ok && a->type) ok = cJSON_AddStringToObject(key, "type", a->type) != NULL;
		if(ok && (a->given & O_BITS)) ok = cJSON_AddNumberToObject(key, "bits", (double)a->bits) != NULL;
		if(ok && a->store) ok = cJSON_AddStringToObject(key, "store", a->store) != NULL;
	}else if(ok && strcmp(s->command, "createDevice") == 0){
		ctl_error("device create needs --type ec|rsa or --key-uri URI");
		cJSON_Delete(cmd);
		return NULL;
	}
	if(!ok){
		ctl_error("out of memory");
		cJSON_Delete(cmd);
		return NULL;
	}
	return cmd;
}

static const char *str_of(const cJSON *o, const char *name)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
	return cJSON_IsString(v) ? v->valuestring : "";
}

/* Prints an answer: lists as lines, everything else as pretty JSON. */
static void print_data(const struct sub *s, const cJSON *data)
{
	if(data == NULL) return;
	if(strcmp(s->command, "listDevices") == 0){
		const cJSON *devs = cJSON_GetObjectItemCaseSensitive(data, "devices");
		for(const cJSON *d = devs && cJSON_IsArray(devs) ? devs->child : NULL; d; d = d->next){
			printf("%-32s %-32s %-8s %s\n", str_of(d, "id"), str_of(d, "username"),
					cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(d, "enabled")) ? "enabled" : "disabled",
					str_of(d, "kid"));
		}
		return;
	}
	if(strcmp(s->command, "listGateways") == 0){
		const cJSON *gws = cJSON_GetObjectItemCaseSensitive(data, "gateways");
		for(const cJSON *g = gws && cJSON_IsArray(gws) ? gws->child : NULL; g; g = g->next){
			printf("%-32s", str_of(g, "username"));
			const cJSON *devs = cJSON_GetObjectItemCaseSensitive(g, "devices");
			const char *sep = " ";
			for(const cJSON *d = devs && cJSON_IsArray(devs) ? devs->child : NULL; d; d = d->next){
				printf("%s%s", sep, cJSON_IsString(d) ? d->valuestring : "?");
				sep = ",";
			}
			putchar('\n');
		}
		return;
	}
	/* get* answers wrap the object: print the object itself. */
	const cJSON *inner = cJSON_GetObjectItemCaseSensitive(data, "device");
	if(inner == NULL) inner = cJSON_GetObjectItemCaseSensitive(data, "gateway");
	char *text = cJSON_Print(inner ? inner : data);
	if(text){
		printf("%s\n", text);
		free(text);
	}
}

/* rotate-key --register: uploads the pending key of rotateKey's answer to akenza. Returns 0, or 1
 * after printing why (the key stays pending on the broker then). */
static int register_pending(const struct args *a, const char *id, const cJSON *data)
{
	const char *pem = str_of(data, "public_key"), *cert = str_of(data, "certificate");
	if(pem[0] == '\0' || (a->reg_cert && cert[0] == '\0')){
		ctl_error("the broker's answer has no %s to register", pem[0] ? "certificate" : "public_key");
		return 1;
	}
	if(ctl_akenza_register_key(&a->api, id, pem, a->reg_cert ? cert : NULL)){
		ctl_error("%s: the new key stays pending, unused: register it (akenzactl akenza register %s "
				"--registry ...), then commit-key", id, id);
		return 1;
	}
	return 0;
}

/* Runs one subcommand. */
static int run_sub(int argc, char **argv, const char *group, const struct sub *s)
{
	struct args a = {.api = {.max_retries = -1}};
	const char *positional = NULL;
	int prc = parse_args(argc, argv, group, s, &a, &positional);
	if(prc){
		OPENSSL_cleanse(a.admin_pw, sizeof(a.admin_pw));
		return prc == 1 ? 0 : 2;
	}
	char pwbuf[1024];
	cJSON *cmd = build_command(s, &a, positional, pwbuf, sizeof(pwbuf));
	if(cmd == NULL){
		OPENSSL_cleanse(a.admin_pw, sizeof(a.admin_pw));
		return 1;
	}
	cJSON *data = NULL;
	int rc = ctl_request(&a.conn, cmd, &data);   /* takes cmd */
	OPENSSL_cleanse(pwbuf, sizeof(pwbuf));
	OPENSSL_cleanse(a.admin_pw, sizeof(a.admin_pw));
	if(rc == 0) print_data(s, data);
	if(rc == 0 && a.reg) rc = register_pending(&a, positional, data);
	cJSON_Delete(data);
	return rc;
}

/* akenzactl GROUP SUBCOMMAND ...: argv[0] is the group. */
static int run_group(int argc, char **argv, const char *group, const struct sub *subs, size_t n)
{
	if(argc < 2){
		print_group_help(stderr, group, subs, n);
		return 2;
	}
	if(strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "help") == 0){
		print_group_help(stdout, group, subs, n);
		return 0;
	}
	for(size_t i = 0; i < n; i++){
		if(strcmp(argv[1], subs[i].name) == 0) return run_sub(argc - 1, argv + 1, group, &subs[i]);
	}
	ctl_error("%s: unknown command '%s'", group, argv[1]);
	print_group_help(stderr, group, subs, n);
	return 2;
}

int cmd_device(int argc, char **argv)
{
	return run_group(argc, argv, "device", device_subs, sizeof(device_subs)/sizeof(device_subs[0]));
}

int cmd_gateway(int argc, char **argv)
{
	return run_group(argc, argv, "gateway", gateway_subs, sizeof(gateway_subs)/sizeof(gateway_subs[0]));
}

int cmd_status(int argc, char **argv)
{
	return run_sub(argc, argv, NULL, &status_sub);
}
