/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* fleet.h - devices and the keys akenza should hold for them, and registering them with akenza's
 * REST API (cmd_akenza.c); shared with the CSV import (cmd_import.c). */
#ifndef FLEET_H
#define FLEET_H

#include <stdbool.h>
#include <stddef.h>
#include <openssl/evp.h>
#include "akenzactl.h"
#include "akz_keystore.h"

/* A key akenza should hold for a device. */
struct fleet_key {
	EVP_PKEY *pub;           /* its public part (NULL: no such key) */
	char *pem;               /* PUBLIC KEY PEM */
	char *cert;              /* self-signed certificate PEM, uploaded instead of pem when set */
	enum akz_alg alg;
	char kid[AKZ_KID_LEN];
};

/* A device: its current key and, during a rotation, its pending one. */
struct fleet_dev {
	char *id;
	struct fleet_key keys[2];   /* [0] the key in use, [1] the pending next_key */
	char *problem;              /* why its keys could not be read: the device fails, the rest go on */
};

struct fleet {
	struct fleet_dev *devs;
	size_t n, cap;
};

/* How register and prune run. */
struct fleet_opts {
	bool dry_run;            /* look, change nothing */
	bool json;               /* one JSON document on stdout at the end */
	bool create;             /* create devices akenza does not know */
	const char *workspace, *data_flow;   /* for create */
	bool cert;               /* upload certificates (RSA256_X509_PEM, EC256_X509_PEM) */
	int days;                /* their validity */
};

/* Appends a device named id (copied) with no keys. Returns it, or NULL when out of memory. */
struct fleet_dev *fleet_add(struct fleet *f, const char *id);

/* Sets key slot k of d from a PEM public key and, if cert_pem is not NULL, its certificate
 * (both copied). Returns 0, or -1 with a reason in err. */
int fleet_set_pem(struct fleet_dev *d, int k, const char *pem, const char *cert_pem, char *err, size_t errlen);

/* Adds the devices named in ids (nids of them; all: every device) of the registry at path, with
 * their keys loaded from the key store; with o->cert, certificates made from the keys.
 * A device whose keys cannot be read, or that the registry lacks, is added with a problem.
 * Returns 0, or -1 after printing why the registry cannot be read. */
int fleet_from_registry(struct fleet *f, const char *path, const char *keystore, const struct akz_key_opts *ko,
		char **ids, size_t nids, bool all, const struct fleet_opts *o);

void fleet_free(struct fleet *f);

/* Registers every device of f with akenza: looks it up (creating it with o->create), uploads its
 * keys akenza does not hold yet, and reports each device (progress bar on a terminal, a line each
 * otherwise, JSON with o->json) and a summary. Returns the exit status: 0 if every device
 * succeeded, 1 if any failed. */
int fleet_register(const struct ctl_api_args *a, const struct fleet_opts *o, struct fleet *f);

/* akenzactl akenza import (cmd_import.c): argv[0] is "import". Returns the exit status. */
int cmd_import(int argc, char **argv);

#endif
