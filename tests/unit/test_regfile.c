/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* test_regfile.c - unit tests of the registry file edits the control API relies on: atomic
 * replacement, key store paths, id rules and pending keys (next_key). */
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
#include <cJSON.h>
#include "akz_keystore.h"
#include "akz_regfile.h"
#include "akz_registry.h"

static char dir[256];

static void path_in(char *out, size_t n, const char *name)
{
	snprintf(out, n, "%s/%s", dir, name);
}

static int setup(void **state)
{
	(void)state;
	snprintf(dir, sizeof(dir), "/tmp/akz-unit-rf-XXXXXX");
	assert_non_null(mkdtemp(dir));
	return 0;
}

static int teardown(void **state)
{
	(void)state;
	char cmd[300];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	return system(cmd) == 0 ? 0 : -1;
}

static void write_text(const char *path, const char *text, mode_t mode)
{
	FILE *f = fopen(path, "w");
	assert_non_null(f);
	fputs(text, f);
	fclose(f);
	chmod(path, mode);
}

static void test_write_and_replace(void **state)
{
	(void)state;
	char path[512], err[512];
	path_in(path, sizeof(path), "reg.json");
	write_text(path, "{\"devices\":[],\"extra\":{\"kept\":true}}", 0640);

	cJSON *root = akz_regfile_read(path, err, sizeof(err));
	assert_non_null(root);
	cJSON_AddStringToObject(root, "added", "yes");
	char *tmp = akz_regfile_write_tmp(path, root, err, sizeof(err));
	cJSON_Delete(root);
	assert_non_null(tmp);
	char want[600];
	snprintf(want, sizeof(want), "%s.tmp", path);
	assert_string_equal(tmp, want);
	struct stat sb;
	assert_int_equal(stat(tmp, &sb), 0);
	assert_int_equal(sb.st_mode & 0777, 0640);   /* the mode of the file it replaces */
	/* until the rename, the file is unchanged */
	root = akz_regfile_read(path, err, sizeof(err));
	assert_null(cJSON_GetObjectItem(root, "added"));
	cJSON_Delete(root);
	assert_int_equal(akz_regfile_replace(tmp, path, err, sizeof(err)), 0);
	assert_int_not_equal(access(tmp, F_OK), 0);
	free(tmp);
	root = akz_regfile_read(path, err, sizeof(err));
	assert_non_null(root);
	assert_string_equal(cJSON_GetObjectItem(root, "added")->valuestring, "yes");
	assert_true(cJSON_IsTrue(cJSON_GetObjectItem(cJSON_GetObjectItem(root, "extra"), "kept")));
	cJSON_Delete(root);

	/* a stale temporary file does not stop the next write */
	write_text(want, "junk", 0600);
	root = cJSON_CreateObject();
	tmp = akz_regfile_write_tmp(path, root, err, sizeof(err));
	cJSON_Delete(root);
	assert_non_null(tmp);
	unlink(tmp);
	free(tmp);

	/* a new file gets 0600 */
	char fresh[512];
	path_in(fresh, sizeof(fresh), "fresh.json");
	root = cJSON_CreateObject();
	tmp = akz_regfile_write_tmp(fresh, root, err, sizeof(err));
	cJSON_Delete(root);
	assert_non_null(tmp);
	assert_int_equal(stat(tmp, &sb), 0);
	assert_int_equal(sb.st_mode & 0777, 0600);
	unlink(tmp);
	free(tmp);
}

static void test_read_errors(void **state)
{
	(void)state;
	char path[512], err[512] = "";
	path_in(path, sizeof(path), "missing.json");
	assert_null(akz_regfile_read(path, err, sizeof(err)));
	assert_non_null(strstr(err, "cannot open"));
	path_in(path, sizeof(path), "broken.json");
	write_text(path, "{\"devices\": [", 0600);
	assert_null(akz_regfile_read(path, err, sizeof(err)));
	assert_non_null(strstr(err, "not valid JSON"));
	/* a directory that does not exist: nothing is left behind */
	char nodir[512];
	path_in(nodir, sizeof(nodir), "no/such/reg.json");
	cJSON *root = cJSON_CreateObject();
	assert_null(akz_regfile_write_tmp(nodir, root, err, sizeof(err)));
	assert_non_null(strstr(err, "cannot create"));
	cJSON_Delete(root);
	assert_int_equal(akz_regfile_replace("/nonexistent/x.tmp", "/nonexistent/x", err, sizeof(err)), -1);
	/* a symbolic link is refused: a rename would replace the link */
	char target[512], link_path[512];
	path_in(target, sizeof(target), "target.json");
	path_in(link_path, sizeof(link_path), "link.json");
	write_text(target, "{}", 0600);
	assert_int_equal(symlink(target, link_path), 0);
	root = cJSON_CreateObject();
	assert_null(akz_regfile_write_tmp(link_path, root, err, sizeof(err)));
	assert_non_null(strstr(err, "symbolic link"));
	cJSON_Delete(root);
}

static void test_ids_and_paths(void **state)
{
	(void)state;
	assert_null(akz_registry_bad_id_reason("dev-01"));
	assert_null(akz_registry_bad_id_reason("capteur-\xc3\xa9t\xc3\xa9"));
	assert_non_null(akz_registry_bad_id_reason(""));
	assert_non_null(akz_registry_bad_id_reason("a/b"));
	assert_non_null(akz_registry_bad_id_reason("a+b"));
	assert_non_null(akz_registry_bad_id_reason("#"));
	assert_non_null(akz_registry_bad_id_reason("tab\there"));
	assert_non_null(akz_registry_bad_id_reason("bad\xc3"));
	assert_non_null(akz_registry_bad_id_reason("*"));
	assert_null(akz_registry_bad_id_reason("a*"));
	assert_null(akz_registry_bad_id_reason("caf\xc3\xa9"));
	/* What token minting refuses, the registry refuses: overlong forms, surrogates, code
	 * points past U+10FFFF, C1 controls. */
	static const char *const bad_utf8[] = {"a\xc0\x80", "a\xe0\x80\xaf", "a\xed\xa0\x80",
		"a\xf4\x90\x80\x80", "a\xc2\x9b", "a\xf8\x88\x80\x80\x80"};
	for(size_t i = 0; i < sizeof(bad_utf8) / sizeof(bad_utf8[0]); i++){
		assert_non_null(akz_registry_bad_id_reason(bad_utf8[i]));
		assert_non_null(akz_registry_bad_username_reason(bad_utf8[i]));
	}
	char longid[200];
	memset(longid, 'x', sizeof(longid) - 1);
	longid[sizeof(longid) - 1] = '\0';
	assert_non_null(akz_registry_bad_id_reason(longid));

	char *p = akz_registry_keystore_path("/etc/akz/devices.json", NULL, "d1", ".next.pem");
	assert_string_equal(p, "/etc/akz/keys/d1.next.pem");
	free(p);
	p = akz_registry_keystore_path("/etc/akz/devices.json", "/var/keys", "d1", ".pem");
	assert_string_equal(p, "/var/keys/d1.pem");
	free(p);
	p = akz_registry_keystore_path("/etc/akz/devices.json", "k", "d1", ".pub.pem");
	assert_string_equal(p, "/etc/akz/k/d1.pub.pem");
	free(p);
	p = akz_registry_keystore_path("devices.json", NULL, "d1", ".pem");
	assert_string_equal(p, "./keys/d1.pem");
	free(p);
	p = akz_registry_resolve_key("/etc/akz/devices.json", "keys/x.pem");
	assert_string_equal(p, "/etc/akz/keys/x.pem");
	free(p);
	/* No provider here loads pkcs11: URIs, so that is a file name with a colon, as OpenSSL would
	 * read it; every spelling of file: names the same file. */
	p = akz_registry_resolve_key("/etc/akz/devices.json", "pkcs11:token=a;object=b");
	assert_string_equal(p, "/etc/akz/pkcs11:token=a;object=b");
	free(p);
	static const char *const spellings[] = {"file:/k/a.pem", "FILE:/k/a.pem", "File:///k/a.pem",
		"fIlE://localhost/k/a.pem", "/k/a.pem"};
	for(size_t i = 0; i < sizeof(spellings) / sizeof(spellings[0]); i++){
		p = akz_registry_resolve_key("/etc/akz/devices.json", spellings[i]);
		assert_string_equal(p, "/k/a.pem");
		free(p);
	}
	p = akz_registry_resolve_key("/etc/akz/devices.json", "keys:a.pem");
	assert_string_equal(p, "/etc/akz/keys:a.pem");
	free(p);
	const char *path;
	assert_int_equal(akz_keyref_parse("file://elsewhere/k/a.pem", &path), AKZ_KEYREF_BAD);
	assert_int_equal(akz_keyref_parse("FILE:", &path), AKZ_KEYREF_BAD);
	assert_int_equal(akz_keyref_parse("File:keys/a.pem", &path), AKZ_KEYREF_PATH);
	assert_string_equal(path, "keys/a.pem");
}

static void test_next_key(void **state)
{
	(void)state;
	char keys[512], reg[512], err[512], priv[600], next[600];
	path_in(keys, sizeof(keys), "keys");
	mkdir(keys, 0700);
	path_in(reg, sizeof(reg), "devices.json");
	struct akz_key *k1, *k2;
	assert_int_equal(akz_key_generate(AKZ_ALG_ES256, 0, &k1, err, sizeof(err)), 0);
	assert_int_equal(akz_key_generate(AKZ_ALG_RS256, 2048, &k2, err, sizeof(err)), 0);
	snprintf(priv, sizeof(priv), "%s/d.pem", keys);
	snprintf(next, sizeof(next), "%s/d.next.pem", keys);
	assert_int_equal(akz_key_write(k1, priv, NULL, err, sizeof(err)), 0);
	assert_int_equal(akz_key_write(k2, next, NULL, err, sizeof(err)), 0);
	static const char hash[] = "$7$101$NwjylbCRZwEpqPIK$Yv03m6CKOpvWy5oKIJCqIWgwpCfD+x/3KP5bEDDwkS9jLeIjdCRHcOqU4kT2+VB9/ObqWA0buPl5uARhIC6OiQ==";
	char text[2048];
	snprintf(text, sizeof(text), "{\"devices\":[{\"id\":\"d\",\"password\":\"%s\",\"next_key\":\"%s\"}]}", hash, next);
	write_text(reg, text, 0600);
	struct akz_registry *r;
	assert_int_equal(akz_registry_load(reg, NULL, NULL, NULL, NULL, &r), 0);
	const struct akz_device *d = akz_registry_find_device(r, "d");
	assert_string_equal(akz_key_kid(d->key), akz_key_kid(k1));
	assert_string_equal(akz_key_kid(d->next_key), akz_key_kid(k2));
	assert_string_equal(d->next_key_uri, next);
	/* a reload takes unchanged keys over (the very same key object) ... */
	struct akz_registry *r2, *r3;
	assert_int_equal(akz_registry_reload(reg, NULL, NULL, r, NULL, NULL, &r2), 0);
	assert_ptr_equal(akz_registry_find_device(r2, "d")->key, d->key);
	assert_ptr_equal(akz_registry_find_device(r2, "d")->next_key, d->next_key);
	/* ... and the pending key becomes the key without being parsed again (commitKey) */
	snprintf(text, sizeof(text), "{\"devices\":[{\"id\":\"d\",\"password\":\"%s\",\"key\":\"%s\"}]}", hash, next);
	write_text(reg, text, 0600);
	assert_int_equal(akz_registry_reload(reg, NULL, NULL, r2, NULL, NULL, &r3), 0);
	assert_ptr_equal(akz_registry_find_device(r3, "d")->key, d->next_key);
	akz_registry_free(r3);
	/* a changed file (here: its mode) is loaded again, and checked again */
	chmod(next, 0644);
	assert_int_equal(akz_registry_reload(reg, NULL, NULL, r2, NULL, NULL, &r3), -1);
	chmod(next, 0600);
	assert_int_equal(akz_registry_reload(reg, NULL, NULL, r2, NULL, NULL, &r3), 0);
	assert_ptr_not_equal(akz_registry_find_device(r3, "d")->key, d->next_key);
	assert_string_equal(akz_key_kid(akz_registry_find_device(r3, "d")->key), akz_key_kid(k2));
	akz_registry_free(r3);
	akz_registry_free(r2);
	akz_registry_free(r);
	/* a pending key that does not load makes the registry invalid */
	snprintf(text, sizeof(text), "{\"devices\":[{\"id\":\"d\",\"password\":\"%s\",\"next_key\":\"%s/none.pem\"}]}", hash, keys);
	write_text(reg, text, 0600);
	assert_int_equal(akz_registry_load(reg, NULL, NULL, NULL, NULL, &r), -1);
	akz_key_unref(k1);
	akz_key_unref(k2);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_write_and_replace),
		cmocka_unit_test(test_read_errors),
		cmocka_unit_test(test_ids_and_paths),
		cmocka_unit_test(test_next_key),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
