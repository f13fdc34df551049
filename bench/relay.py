#!/usr/bin/env python3
"""A UDP relay that delays every datagram by DELAY_MS, both ways.

Put in front of a node's QUIC data port to give its links latency where the
kernel has no `netem`:  shoal node --data 127.0.0.1:PORT --data-advertise 127.0.0.1:LISTEN

    relay.py LISTEN_PORT TARGET_PORT DELAY_MS
"""
import asyncio
import sys


class Back(asyncio.DatagramProtocol):
    """The relay's socket towards the target, one per client address."""

    def __init__(self, front, client, delay):
        self.front, self.client, self.delay = front, client, delay

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, _addr):
        loop = asyncio.get_running_loop()
        loop.call_later(self.delay, self.front.sendto, data, self.client)


class Front(asyncio.DatagramProtocol):
    def __init__(self, target, delay):
        self.target, self.delay, self.backs = target, delay, {}

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, client):
        loop = asyncio.get_running_loop()
        back = self.backs.get(client)
        if back is None:
            back = self.backs[client] = asyncio.ensure_future(
                loop.create_datagram_endpoint(
                    lambda: Back(self.transport, client, self.delay), remote_addr=self.target
                )
            )
        loop.call_later(self.delay, self.forward, back, data)

    @staticmethod
    def forward(back, data):
        if back.done():
            back.result()[0].sendto(data)
        else:
            back.add_done_callback(lambda f: f.result()[0].sendto(data))


async def main():
    listen, target, delay_ms = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(
        lambda: Front(("127.0.0.1", target), delay_ms / 1000.0), local_addr=("127.0.0.1", listen)
    )
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
