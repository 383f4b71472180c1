/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* regfile.c - reading the registry as a JSON tree and replacing the file atomically. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cJSON.h>
#include "akz_regfile.h"
#include "akz_util.h"

#define REGFILE_MAX_BYTES (64L * 1024 * 1024)

cJSON *akz_regfile_read(const char *path, char *err, size_t errlen)
{
	FILE *f = fopen(path, "rb");
	if(f == NULL){
		akz_set_err(err, errlen, "%s: cannot open: %s", path, strerror(errno));
		return NULL;
	}
	struct stat sb;
	if(fstat(fileno(f), &sb) != 0 || !S_ISREG(sb.st_mode) || sb.st_size > REGFILE_MAX_BYTES){
		akz_set_err(err, errlen, "%s: not a regular file of at most 64 MiB", path);
		fclose(f);
		return NULL;
	}
	char *buf = malloc((size_t)sb.st_size + 1);
	if(buf == NULL){
		akz_set_err(err, errlen, "%s: out of memory", path);
		fclose(f);
		return NULL;
	}
	size_t n = fread(buf, 1, (size_t)sb.st_size, f);
	bool bad = ferror(f) != 0;
	fclose(f);
	if(bad){
		akz_set_err(err, errlen, "%s: read error", path);
		free(buf);
		return NULL;
	}
	buf[n] = '\0';
	cJSON *tree = cJSON_ParseWithLength(buf, n);
	free(buf);
	if(tree == NULL) akz_set_err(err, errlen, "%s: not valid JSON (fix it by hand, then send SIGHUP)", path);
	return tree;
}

/* Writes all of data to fd. Returns 0, or -1 with errno. */
static int write_all(int fd, const char *data, size_t len)
{
	while(len > 0){
		ssize_t n = write(fd, data, len);
		if(n < 0){
			if(errno == EINTR) continue;
			return -1;
		}
		data += n;
		len -= (size_t)n;
	}
	return 0;
}

char *akz_regfile_write_tmp(const char *path, const cJSON *tree, char *err, size_t errlen)
{
	size_t plen = strlen(path);
	char *tmp = malloc(plen + 5);
	char *text = cJSON_Print(tree);
	if(tmp == NULL || text == NULL){
		akz_set_err(err, errlen, "out of memory");
		free(tmp);
		free(text);
		return NULL;
	}
	snprintf(tmp, plen + 5, "%s.tmp", path);

	/* The registry holds password hashes: keep the file as closed as it was, 0600 by default. */
	mode_t mode = 0600;
	struct stat sb;
	if(lstat(path, &sb) == 0){
		/* A rename would replace the link itself (and leave its target stale): refuse. */
		if(S_ISLNK(sb.st_mode)){
			akz_set_err(err, errlen, "%s is a symbolic link: it cannot be replaced atomically; point "
					"plugin_opt_devices at the file itself", path);
			free(tmp);
			free(text);
			return NULL;
		}
		mode = sb.st_mode & 0777;
	}
	unlink(tmp);   /* a leftover of a crash; O_EXCL below refuses anything placed meanwhile */
	int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
	int rc = -1;
	if(fd < 0){
		akz_set_err(err, errlen, "%s: cannot create: %s", tmp, strerror(errno));
		goto out;
	}
	size_t tlen = strlen(text);
	if(fchmod(fd, mode) != 0 || write_all(fd, text, tlen) != 0 || write_all(fd, "\n", 1) != 0
			|| fsync(fd) != 0){
		akz_set_err(err, errlen, "%s: cannot write: %s", tmp, strerror(errno));
		close(fd);
		unlink(tmp);
		goto out;
	}
	if(close(fd) != 0){
		akz_set_err(err, errlen, "%s: cannot write: %s", tmp, strerror(errno));
		unlink(tmp);
		goto out;
	}
	rc = 0;
out:
	free(text);
	if(rc){
		free(tmp);
		return NULL;
	}
	return tmp;
}

int akz_regfile_sync_dir(const char *path)
{
	char dir[PATH_MAX];
	const char *slash = strrchr(path, '/');
	if(slash == NULL) snprintf(dir, sizeof(dir), ".");
	else if(slash == path) snprintf(dir, sizeof(dir), "/");
	else snprintf(dir, sizeof(dir), "%.*s", (int)(slash - path), path);
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if(fd < 0) return -1;
	int rc = fsync(fd);
	int saved = errno;
	close(fd);
	errno = saved;
	return rc;
}

int akz_regfile_replace(const char *tmp, const char *path, char *err, size_t errlen)
{
	if(rename(tmp, path) != 0){
		akz_set_err(err, errlen, "%s: cannot replace: %s", path, strerror(errno));
		return -1;
	}
	/* Without this the rename itself may not survive a power cut. */
	if(akz_regfile_sync_dir(path) != 0){
		akz_set_err(err, errlen, "%s: replaced, but the directory could not be synced: %s",
				path, strerror(errno));
		return 1;
	}
	return 0;
}
