/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* fuzz_common.h - helpers shared by the fuzz targets: a private temporary directory per process. */
#ifndef FUZZ_COMMON_H
#define FUZZ_COMMON_H

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Removes every plain file in dir (the targets create no subdirectories in it) and, if rmself,
 * dir itself. Best effort: a leftover only costs /tmp space. */
static inline void fuzz_clear_dir(const char *dir, int rmself)
{
	DIR *d = opendir(dir);
	if(d){
		for(struct dirent *e; (e = readdir(d)) != NULL;){
			if(strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
			char p[4200];
			snprintf(p, sizeof(p), "%s/%s", dir, e->d_name);
			unlink(p);
		}
		closedir(d);
	}
	if(rmself) rmdir(dir);
}

/* Writes size bytes to path (mode 0600), replacing it. Returns 0, or -1. */
static inline int fuzz_write_file(const char *path, const void *data, size_t size)
{
	FILE *f = fopen(path, "wb");
	if(f == NULL) return -1;
	size_t n = size ? fwrite(data, 1, size, f) : 0;
	int rc = fclose(f);
	chmod(path, 0600);
	return n == size && rc == 0 ? 0 : -1;
}

#endif
