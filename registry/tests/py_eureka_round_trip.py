"""A real Eureka client, written by someone else, against our registry.

py-eureka-client registers (JSON, with HTTP Basic credentials in the service URL, as
Spring clients carry them), renews, and is discovered through the XML the Eureka
server sends by default; then it cancels its registration on stop.

Usage: python3 py_eureka_round_trip.py <registry base URL> <registry token>
Prints one line per step; the Rust test reads them and checks the registry itself.
"""

import asyncio
import sys
import time

import py_eureka_client.eureka_basic as eureka
import py_eureka_client.eureka_client as eureka_client

BASE, TOKEN = sys.argv[1], sys.argv[2]
READS = f"{BASE}/eureka"
WRITES = READS.replace("http://", f"http://eureka:{TOKEN}@", 1)


async def wait_for(describe, check, seconds=20):
    deadline = time.monotonic() + seconds
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {describe}")
        await asyncio.sleep(0.1)


async def main():
    client = eureka_client.EurekaClient(
        eureka_server=WRITES,
        app_name="py-service",
        instance_id="py-1",
        instance_host="127.0.0.1",
        instance_ip="127.0.0.1",
        instance_port=9999,
        renewal_interval_in_secs=1,
        duration_in_secs=3,
        should_discover=False,
        metadata={"zone": "eu-1"},
    )
    await client.start()
    print("REGISTERED", flush=True)

    async def discovered():
        apps = await eureka.get_applications(READS)
        app = apps.get_application("PY-SERVICE")
        return app.get_instance("py-1") if app else None

    instance = await wait_for("discovery over XML", discovered)
    assert instance.port.port == 9999, instance.port.port
    assert instance.port.enabled, "port enabled"
    assert instance.status == "UP", instance.status
    assert instance.metadata.get("zone") == "eu-1", instance.metadata
    assert instance.dataCenterInfo.className.endswith("DefaultDataCenterInfo")
    print("DISCOVERED", instance.instanceId, instance.ipAddr, instance.port.port, flush=True)

    async def renewed():
        found = await discovered()
        return found and found.leaseInfo.lastRenewalTimestamp > found.leaseInfo.registrationTimestamp

    await wait_for("a renewal", renewed)
    print("RENEWED", flush=True)

    delta = await eureka.get_delta(READS)
    app = delta.get_application("PY-SERVICE")
    assert app and app.get_instance("py-1"), "the registration is in the delta"
    print("DELTA", delta.appsHashcode, flush=True)

    await client.stop()
    print("CANCELLED", flush=True)


asyncio.run(main())
