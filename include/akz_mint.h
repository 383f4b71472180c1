/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_mint.h - device tokens minted without blocking the caller: keys in a TPM sign on the key thread. */
#ifndef AKZ_MINT_H
#define AKZ_MINT_H

#include <stddef.h>
#include <time.h>
#include "akz_keystore.h"

enum akz_mint_rc { AKZ_MINT_DONE, AKZ_MINT_PENDING, AKZ_MINT_FAILED };

/* One device's token being minted on the key thread. Opaque; owned by the caller's *job. */
struct akz_mint;

/* Makes sure a token for device_id (audience as akz_jwt_mint's), signed with key and valid for
 * lifetime s, is ready or on its way, without blocking. A key in memory needs nothing: DONE at once (akz_mint_take mints then).
 * For a key held in a device (akz_key_held) the first call starts minting on the key thread
 * (*job set); later calls return PENDING until the token is ready (DONE, kept in *job), or
 * FAILED with a reason naming the key's URI (*job freed): the device said no, or the key thread
 * has waited longer than timeout_ms on the device (a TPM that stopped answering; a long queue of
 * other devices' tokens is not a failure). A job for another key, or whose token is older than
 * a tenth of its lifetime, is dropped and started again. Never fails otherwise. */
enum akz_mint_rc akz_mint_poll(struct akz_mint **job, struct akz_key *key, const char *audience,
		const char *device_id, long lifetime, int timeout_ms, char *err, size_t errlen);

/* The token: the ready one in *job if it is for key (*job freed then), else, for a key in
 * memory, one minted now with akz_jwt_mint at time now; never waits on a device (a key in a
 * device without a ready token fails: poll until DONE first). Sets *iat to the token's issue
 * time. Returns it (caller cleanses and frees), or NULL with a reason in err. */
char *akz_mint_take(struct akz_mint **job, struct akz_key *key, const char *audience,
		const char *device_id, time_t now, long lifetime, time_t *iat, char *err, size_t errlen);

/* Drops a job (the key thread skips it, or finishes it alone) and sets *job NULL. NULL *job is
 * ignored. */
void akz_mint_cancel(struct akz_mint **job);

#endif
