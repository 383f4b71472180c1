/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* slow_dns.c - an LD_PRELOAD shim for the tests: a slow or failing name server, in process.
 *
 * getaddrinfo() of a name (not of a numeric address, which needs no name server) sleeps
 * AKZ_DNS_DELAY_MS first, appends the name to the file AKZ_DNS_LOG (one line per call), and fails
 * with EAI_AGAIN while the file AKZ_DNS_FAIL exists; otherwise it answers as the C library does. */
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

typedef int (*gai_fn)(const char *, const char *, const struct addrinfo *, struct addrinfo **);

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
		struct addrinfo **res)
{
	const char *delay = getenv("AKZ_DNS_DELAY_MS");
	const char *log = getenv("AKZ_DNS_LOG");
	const char *fail = getenv("AKZ_DNS_FAIL");
	gai_fn real = (gai_fn)dlsym(RTLD_NEXT, "getaddrinfo");
	unsigned char buf[16];
	if(real == NULL) return EAI_SYSTEM;
	if(node == NULL || inet_pton(AF_INET, node, buf) == 1 || inet_pton(AF_INET6, node, buf) == 1){
		return real(node, service, hints, res);
	}
	if(delay){
		long ms = atol(delay);
		struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
		nanosleep(&ts, NULL);
	}
	if(log){
		FILE *f = fopen(log, "a");
		if(f){
			fprintf(f, "%s\n", node);
			fclose(f);
		}
	}
	if(fail && access(fail, F_OK) == 0) return EAI_AGAIN;
	return real(node, service, hints, res);
}
