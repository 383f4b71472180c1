/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_keythread.h - the one thread that works with keys held in a provider (a TPM). */
#ifndef AKZ_KEYTHREAD_H
#define AKZ_KEYTHREAD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <openssl/types.h>

/* Every operation on a provider-held key (load, sign, generate) runs on this thread, one at a
 * time, in the order submitted: a TPM executes one command at a time, the tpm2 provider's
 * connection to it is not safe for two threads, and a TPM that stops answering must stall this
 * thread only, never the broker or the bridge thread. */

/* One operation: run(arg) on the key thread. Opaque; reference counted between the submitter
 * and the thread. */
struct akz_kjob;

/* Queues run(arg). free_arg(arg), if not NULL, is called once the job is released by both
 * sides (or at once if the job cannot be queued). Starts the thread on first use.
 * Returns the job (the caller's reference: release with akz_kjob_release), or NULL when out of
 * memory or the thread cannot be started (then free_arg has run). Any thread. */
struct akz_kjob *akz_kjob_submit(void (*run)(void *arg), void *arg, void (*free_arg)(void *arg));

/* True once the job is over: run has returned, or the job was skipped (akz_keythread_stop).
 * Never blocks. */
bool akz_kjob_done(const struct akz_kjob *job);

/* Waits up to timeout_ms for run to return. True if it has; false if the job was skipped or on
 * timeout (then the job stays queued or running: release it and it finishes, or is skipped,
 * without the caller). */
bool akz_kjob_wait(struct akz_kjob *job, int timeout_ms);

/* Drops the caller's reference. A job not yet started is skipped. NULL is ignored. */
void akz_kjob_release(struct akz_kjob *job);

/* Runs run(arg) on the key thread and waits up to timeout_ms for it; on the key thread itself
 * it runs directly. Returns true if run completed; false on timeout, at once if the key thread
 * has been on its current job for longer than timeout_ms already (a device that stopped
 * answering), or when it could not be queued: then arg is freed with free_arg, when the thread
 * is done with it. When it returns true, arg is the caller's again (free_arg is not called). */
bool akz_kjob_call(void (*run)(void *arg), void *arg, void (*free_arg)(void *arg), int timeout_ms);

/* How long the key thread has been on its current job, in ms (0: idle). A job queued behind a
 * long line is not late; one behind a job that has run longer than the timeout waits on a
 * device that stopped answering. Any thread; never blocks for long. */
int64_t akz_keythread_busy_ms(void);

/* True on the key thread. */
bool akz_keythread_current(void);

/* Stops the thread: queued jobs are skipped; waits up to wait_ms for a running job, after which
 * a thread stuck in a device that does not answer is left behind (detached). Any thread but
 * the key thread; never fails. The thread starts again on the next submit. */
void akz_keythread_stop(int wait_ms);

/* ---- the library context keys held in a provider live in ------------------------------ */

/* Names the providers to load (a list separated by commas or spaces, e.g. "default,tpm2"), and/or
 * an OpenSSL configuration file to load (providers with their parameters, default_properties),
 * into a library context of the key thread's own,
 * apart from the one the broker's and the bridge's TLS use. NULL leaves a setting unset; with
 * neither set, keys are loaded in OpenSSL's default context (configured by OPENSSL_CONF).
 * Nothing is loaded here: the key thread loads them before its first job, and again before the
 * next job after a failure (the TPM absent at start). Must be called before the first key is
 * loaded. Returns 0, or -1 with a reason (out of memory, conf_file unreadable, called too late). */
int akz_keythread_configure(const char *providers, const char *conf_file, char *err, size_t errlen);

/* How long callers wait for a job on a provider-held key before giving up (default 30 s). */
void akz_keythread_set_timeout(int timeout_ms);
int akz_keythread_timeout_ms(void);

/* On the key thread: the library context to load and use provider-held keys in (NULL: OpenSSL's
 * default one), loading the configured providers first if they are not loaded yet, or again if
 * provider `need` (NULL: any) is missing from it. Returns 0, or -1 with a reason naming the
 * provider or file that failed (nothing is kept then: the next call tries again). */
int akz_keythread_libctx(const char *need, OSSL_LIB_CTX **ctx, char *err, size_t errlen);

/* Whether the providers configured for the key thread (akz_keythread_configure) offer an
 * OSSL_STORE loader for URIs of scheme ("handle"): 1 yes, 0 no (or none configured: then OpenSSL's
 * default context is the one to ask), -1 cannot tell (they did not load, or did not answer within
 * the timeout). Asks on the key thread, which loads them first if needed. Any thread but the key
 * thread; waits at most the key thread's timeout. */
int akz_keythread_has_loader(const char *scheme);

/* On the key thread, after an operation on a device key failed: the next akz_keythread_libctx
 * unloads and loads the providers again. The tpm2 provider keeps one connection to the TPM and
 * does not recover it after an I/O error (the TPM restarted, its daemon or socket gone); for a
 * key the TPM no longer has this costs a reload (milliseconds) per retry of that device. Has no
 * effect on OpenSSL's default context (no plugin_opt_providers/openssl_conf). */
void akz_keythread_failed(void);

/* Stops the key thread (as akz_keythread_stop) and unloads the providers and the library
 * context, unless the thread is stuck in a device (then they are left to the process's end).
 * Forgets the settings. Never fails. */
void akz_keythread_cleanup(void);

/* OpenSSL's oldest (oldest: the cause, such as a provider's "cannot connect" before OpenSSL's
 * "init fail") or newest (the tpm2 provider puts the TPM's answer in the detail of the last one)
 * error of this thread's queue as "reason: detail" into buf, which it returns; "unknown error"
 * when the queue is empty. Leaves the queue as it is. Never fails. */
const char *akz_openssl_error(char *buf, size_t len, bool oldest);

#endif
