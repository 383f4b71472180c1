/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_regfile.h - the registry file as a JSON tree: read it, and replace it atomically. */
#ifndef AKZ_REGFILE_H
#define AKZ_REGFILE_H

#include <stddef.h>
#include <cJSON.h>

/* Reads and parses the file at path (at most 64 MiB). Returns the tree (caller frees with
 * cJSON_Delete), or NULL with a reason naming the file in err. */
cJSON *akz_regfile_read(const char *path, char *err, size_t errlen);

/* Writes tree, formatted, to "<path>.tmp" in the same directory (so that a rename replaces
 * path atomically and relative key paths mean the same), with the mode of the existing file
 * (0600 if there is none), and fsyncs it. A stale temporary file is replaced.
 * Returns the temporary file's name (caller frees; the caller also unlinks or renames the file),
 * or NULL with a reason in err (nothing left on disk then), also when path is a symbolic link
 * (a rename would replace the link, not its target). */
char *akz_regfile_write_tmp(const char *path, const cJSON *tree, char *err, size_t errlen);

/* Renames tmp over path and fsyncs the directory, so that the new content survives a crash.
 * Returns 0; 1 if path was replaced but the directory could not be synced (reason in err);
 * -1 if path was not replaced (reason in err, tmp left in place). */
int akz_regfile_replace(const char *tmp, const char *path, char *err, size_t errlen);

/* fsyncs the directory holding path (after a rename or link in it). Returns 0, or -1 with errno. */
int akz_regfile_sync_dir(const char *path);

#endif
