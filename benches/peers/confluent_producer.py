#!/usr/bin/env python3
"""The peer labgate is compared with: a plain confluent-kafka producer (PyPI), as a lab
script would send readings straight to Kafka. Sends N copies of one JSON reading (read
from stdin) to a topic and waits until the broker acknowledged all of them.

  confluent_producer.py BOOTSTRAP TOPIC N < message.json

Prints {"messages": N, "seconds": S, "rate": N/S, "peak_rss_kb": ...}. Not durable on
the sending side: what is in its memory when the process dies is lost.
"""
import json
import resource
import sys
import time

from confluent_kafka import Producer


def main():
    bootstrap, topic, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    message = sys.stdin.read().strip().encode()
    failed = []
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all"})

    def done(err, _msg):
        if err is not None:
            failed.append(str(err))

    start = time.monotonic()
    for k in range(n):
        while True:
            try:
                p.produce(topic, value=message, key=str(k % 20).encode(), on_delivery=done)
                break
            except BufferError:
                p.poll(0.01)
        p.poll(0)
    left = p.flush(120)
    seconds = time.monotonic() - start
    if left or failed:
        sys.exit(f"{left} not delivered, {len(failed)} failed: {failed[:3]}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"messages": n, "seconds": seconds, "rate": n / seconds, "peak_rss_kb": rss}))


if __name__ == "__main__":
    main()
