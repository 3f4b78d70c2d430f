"""A small lab application for the demo: it runs its own chronoamperometry "experiments"
and hands events and data to labgate through labgate_client, and it obeys pause,
resume and stop commands that reach it through labgate's command path.

    LABGATE_URL=http://127.0.0.1:9464 LABGATE_TOKEN=... python3 demo_lab_app.py
"""

import math
import random
import sys
import threading
import time

from labgate_client import KafkaClient

paused = threading.Event()
stopped = threading.Event()


def say(text):
    print(f"[lab-app] {text}", flush=True)


def on_pause(cmd):
    paused.set()
    say(f"pause received ({cmd['command_id']}): holding the potential")
    return "engine paused"


def on_resume(cmd):
    paused.clear()
    say("resume received: measuring again")
    return "engine resumed"


def on_stop(cmd):
    stopped.set()
    say("stop received: ending the run")
    return "run ended, cell off"


def run(client, n):
    exp = f"lab-app-run-{int(time.time())}-{n}"
    client.send_event("experiment_started", {"program": "CA", "steps": 1}, experiment_id=exp,
                      sample=f"sample-{n}", operator="demo")
    say(f"started {exp}")
    t, sent = 0.0, 0
    while sent < 400 and not stopped.is_set():
        if paused.is_set():
            time.sleep(0.1)
            continue
        points = []
        for _ in range(10):
            t += 0.05
            i = 2e-6 / math.sqrt(t) * (1 + random.gauss(0, 0.01))
            points.append({"t": round(t, 3), "e": 0.4, "i": i})
        client.send_data("CA", points, exp, step_index=0)
        sent += len(points)
        time.sleep(0.5)
    if stopped.is_set():
        client.send_event("experiment_stopped", {"reason": "stop command", "points": sent}, experiment_id=exp)
    else:
        client.send_event("experiment_completed", {"points": sent}, experiment_id=exp)
    say(f"{exp} ended after {sent} points")


def main():
    client = KafkaClient()
    if not client.connect():
        say("labgate is not reachable; records wait in memory until it is")
    client.on_command("pause", on_pause)
    client.on_command("resume", on_resume)
    client.on_command("stop", on_stop)
    n = 0
    try:
        while True:
            n += 1
            stopped.clear()
            run(client, n)
            time.sleep(2)
    except KeyboardInterrupt:
        pass
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
