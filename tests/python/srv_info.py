"""Discover imagemesh services with a NATS client nobody here wrote (nats-py).

Sends $SRV.INFO and $SRV.STATS, gathers every reply for a moment, parses them with nats-py's
own micro-service types, and prints one JSON object: {"info": [...], "stats": [...]}.
Usage: python3 srv_info.py NATS_URL
With NATS_NKEY_FILE and NATS_CA_FILE set, connects with that nkey identity over TLS verified
by that CA (the secured mesh).
"""

import asyncio
import json
import os
import re
import ssl
import sys

import nats
from nats.micro.service import ServiceInfo, ServiceStats


async def gather(nc, subject, parse, wait=1.0):
    inbox = nc.new_inbox()
    replies = []
    sub = await nc.subscribe(inbox, cb=None)
    await nc.publish(subject, b"", reply=inbox)
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            break
        try:
            msg = await sub.next_msg(timeout=remaining)
        except nats.errors.TimeoutError:
            break
        replies.append(parse(json.loads(msg.data)))
    await sub.unsubscribe()
    return replies


def stats_from_dict(data):
    # NATS servers and clients (Go, async-nats) write RFC 3339 timestamps with nanoseconds;
    # nats-py parses them with strptime's %f, which takes at most microseconds. Trim the extra
    # digits so nats-py's own type can read the reply.
    data["started"] = re.sub(r"(\.\d{6})\d+Z$", r"\1Z", data["started"])
    # async-nats 0.51 leaves optional fields (service metadata, an endpoint's custom data and
    # last error) out of STATS replies; nats-py requires the keys.
    data.setdefault("metadata", {})
    for endpoint in data.get("endpoints") or []:
        endpoint.setdefault("data", None)
        endpoint.setdefault("last_error", "")
    return ServiceStats.from_dict(data)


async def main(url):
    options = {}
    if os.environ.get("NATS_NKEY_FILE"):
        options["nkeys_seed"] = os.environ["NATS_NKEY_FILE"]
    if os.environ.get("NATS_CA_FILE"):
        options["tls"] = ssl.create_default_context(cafile=os.environ["NATS_CA_FILE"])
    nc = await nats.connect(url, **options)
    infos = await gather(nc, "$SRV.INFO", ServiceInfo.from_dict)
    stats = await gather(nc, "$SRV.STATS", stats_from_dict)
    await nc.close()
    print(json.dumps({
        "info": [{"name": i.name, "version": i.version, "id": i.id,
                  "endpoints": [e.subject for e in i.endpoints]} for i in infos],
        "stats": [{"name": s.name, "endpoints": [e.name for e in s.endpoints]} for s in stats],
    }))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
