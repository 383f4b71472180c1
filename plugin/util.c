/* util.c - small helpers every module shares. */
#include <stdarg.h>
#include <stdio.h>
#include "akz_util.h"

void akz_set_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;
	if(err == NULL || errlen == 0) return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}
