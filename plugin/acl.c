/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* acl.c - per-device topic rules: a device speaks only for itself, a gateway for its devices. */
#include <string.h>
#include "akz_mosquitto.h"
#include "akz_auth.h"
#include "akz_registry.h"
#include "akz_topic.h"
#include "akz_util.h"

/* The registry identity behind a local username: a device or a gateway (or neither). */
struct principal {
	const struct akz_device *dev;
	const struct akz_gateway *gw;
};

/* True if the principal may act for the enabled registry device named by the topic's id. */
static bool serves(const struct akz_registry *reg, const struct principal *who, const char *id, size_t idlen)
{
	char buf[256];
	if(idlen >= sizeof(buf)) return false;
	memcpy(buf, id, idlen);
	buf[idlen] = '\0';
	const struct akz_device *d = akz_registry_find_device(reg, buf);
	if(d == NULL || !d->enabled) return false;
	return who->dev ? who->dev == d : akz_gateway_serves(who->gw, buf);
}

/* One rule for every access: the topic (or subscription filter) must lie in the up or down
 * tree of a device the principal serves. A filter's wildcards may only stand below the id,
 * so "/down/device/id/+/#" or "#" never reach another device. */
static bool may_access(const struct akz_registry *reg, const struct principal *who, const char *topic,
		enum akz_topic_dir dir)
{
	size_t idlen;
	const char *id = akz_topic_device(topic, dir, &idlen);
	return id != NULL && serves(reg, who, id, idlen);
}

/* True if topic is exactly <prefix><id> for a device the principal serves: its delivery
 * receipts. No wildcards: a receipt filter names one device. */
static bool may_read_receipts(const struct akz_registry *reg, const struct principal *who,
		const char *topic, const char *prefix)
{
	size_t plen = prefix ? strlen(prefix) : 0;
	if(prefix == NULL || strncmp(topic, prefix, plen) != 0) return false;
	const char *id = topic + plen;
	size_t idlen = strlen(id);
	return idlen > 0 && strpbrk(id, "/+#") == NULL && serves(reg, who, id, idlen);
}

int akz_acl_check(const struct akz_registry *reg, const char *receipts_prefix,
		struct mosquitto_evt_acl_check *ev)
{
	const char *username = mosquitto_client_username(ev->client);
	struct principal who = {
		.dev = akz_registry_find_device_by_username(reg, username),
		.gw = akz_registry_find_gateway(reg, username),
	};
	/* Everyone else, $CONTROL/akenza/... included, is for the acl_file or dynamic-security to
	 * decide: this plugin never grants the control API. Registry users fall through to the rule
	 * below, which denies them anything outside their device topics, $CONTROL too. */
	if(who.dev == NULL && who.gw == NULL) return MOSQ_ERR_PLUGIN_DEFER;

	bool ok;
	switch(ev->access){
	case MOSQ_ACL_WRITE:
		ok = may_access(reg, &who, ev->topic, AKZ_TOPIC_UP);
		break;
	case MOSQ_ACL_READ:
	case MOSQ_ACL_SUBSCRIBE:
		ok = may_access(reg, &who, ev->topic, AKZ_TOPIC_DOWN)
				|| may_read_receipts(reg, &who, ev->topic, receipts_prefix);
		break;
	case MOSQ_ACL_UNSUBSCRIBE:
		ok = true;   /* giving up a subscription never exposes anything */
		break;
	default:
		ok = false;
		break;
	}
	if(!ok && ev->access != MOSQ_ACL_READ){
		const char *cid = mosquitto_client_id(ev->client);
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "akenza: denied %s on '%s' to user '%s' (client '%s')",
				ev->access == MOSQ_ACL_WRITE ? "publish" : "subscribe", akz_esc(ev->topic), akz_esc(username),
				akz_esc(cid ? cid : "?"));
	}
	return ok ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
}
