"""A drop-in replacement for a lab application's Kafka client that talks to labgate.

An application written against the KafkaClient API (connect, send_event, send_data,
on_command, close, is_connected) switches by changing one import:

    from labgate_client import KafkaClient

Records go to the labgate agent's ingest API. The agent answers only once a record is
durable on its disk, and from there it reaches Kafka even across network outages,
broker stalls, crashes and power cuts. Commands (pause, stop ...) arrive from labgate's
signed, validated command path, and what the callback does is reported back as the
command's result.

Standard library only. Address and token: the constructor's `url` and `token`, or the
environment variables LABGATE_URL (default http://127.0.0.1:9464) and LABGATE_TOKEN.
"""

import inspect
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import http.client
from collections import deque
from datetime import datetime, timezone

__all__ = ["KafkaClient", "LabgateClient", "LabgateError"]

log = logging.getLogger("labgate_client")

DEFAULT_URL = "http://127.0.0.1:9464"
# Messages kept in memory while the agent cannot be reached (as the Kafka client did).
OFFLINE_QUEUE_SIZE = 1000


class LabgateError(Exception):
    """The agent refused a request for good (bad token, bad message)."""

    def __init__(self, status, body):
        self.status = status
        self.body = body
        super().__init__(f"labgate answered {status}: {body}")


def _now():
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LabgateClient:
    """Client of the labgate ingest API and of an app device's command stream."""

    def __init__(self, url=None, token=None, timeout=35.0, offline_queue_size=OFFLINE_QUEUE_SIZE, **_kafka_settings):
        # Keyword arguments meant for a Kafka client (bootstrap_servers, client_id ...)
        # are accepted and ignored: the agent holds the Kafka settings.
        self.url = (url or os.environ.get("LABGATE_URL") or DEFAULT_URL).rstrip("/")
        self.token = token or os.environ.get("LABGATE_TOKEN")
        self.timeout = timeout
        self.device_id = None
        self._handlers = {}
        self._queue = deque(maxlen=offline_queue_size)
        self._queue_lock = threading.Lock()
        self._connected = False
        self._stream_open = False
        self._stop = threading.Event()
        self._threads = []
        self.dropped = 0

    # -- the KafkaClient API -------------------------------------------------------

    def connect(self):
        """Checks the agent and the token; starts the background sender (and the
        command stream once a handler is registered). Returns True when connected."""
        try:
            who = self._request("GET", "/v1/whoami")
        except (OSError, LabgateError) as e:
            log.warning("labgate not reachable at %s: %s", self.url, e)
            self._connected = False
            self._start_threads()
            return False
        self.device_id = who.get("device")
        self._connected = True
        self._start_threads()
        return True

    def send_event(self, event_type, data=None, experiment_id=None, **run):
        """An experiment event (`experiment_started`, `step_completed` ...). Extra
        keywords `sample`, `operator`, `eln_ref`, `metadata` describe the run; every
        later record of the run carries them."""
        msg = {
            "type": "experiment_event",
            "event": event_type,
            "timestamp": _now(),
            "experiment_id": experiment_id,
            "data": data or {},
            "event_id": str(uuid.uuid4()),
        }
        msg.update({k: v for k, v in run.items() if v is not None})
        return self._send("/v1/events", msg)

    def send_data(self, technique, points, experiment_id=None, step_index=0):
        """Measured points `[{"t": s, "e": V, "i": A}, ...]` of one step."""
        msg = {
            "type": "echem_data",
            "technique": technique,
            "timestamp": _now(),
            "experiment_id": experiment_id,
            "step_index": step_index,
            "points": list(points),
            "event_id": str(uuid.uuid4()),
        }
        return self._send("/v1/data", msg)

    def send_reading(self, sensor_id, sensor_type, value, unit, location=None, metadata=None):
        """A sensor reading in the usual shape."""
        msg = {
            "sensor_id": sensor_id,
            "sensor_type": sensor_type,
            "value": value,
            "unit": unit,
            "timestamp": _now(),
            "event_id": str(uuid.uuid4()),
        }
        if location is not None:
            msg["location"] = location
        if metadata is not None:
            msg["metadata"] = metadata
        return self._send("/v1/readings", msg)

    def on_command(self, command, callback):
        """Calls `callback` for each `command` ("pause", "resume", "stop", "start")
        labgate routes to this application. The callback gets the command (a dict with
        command, command_id, params) if it takes an argument. Returning normally reports
        the command completed (a returned string is the result's text); raising reports
        it failed with the exception's text."""
        self._handlers[command] = callback
        if self._connected:
            self._start_threads()

    def close(self):
        """Sends what is queued (for up to the timeout) and stops."""
        self.flush(self.timeout)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        self._connected = False

    def is_connected(self):
        """Whether the agent answers (and, with handlers, the command stream is open)."""
        if self._handlers:
            return self._connected and self._stream_open
        return self._connected

    # -- beyond the KafkaClient API --------------------------------------------------

    def flush(self, timeout=30.0):
        """Waits until the offline queue is empty; True when it is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._queue_lock:
                if not self._queue:
                    return True
            self._drain_queue()
            time.sleep(0.1)
        with self._queue_lock:
            return not self._queue

    def queued(self):
        with self._queue_lock:
            return len(self._queue)

    # -- internals ---------------------------------------------------------------------

    def _headers(self, content_type="application/json"):
        h = {"Content-Type": content_type, "Accept": "application/json"}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    def _request(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=self._headers())
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                text = r.read().decode() or "{}"
                return json.loads(text)
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            if e.code in (503, 408) or e.code >= 500:
                raise ConnectionError(f"labgate busy ({e.code}): {text}") from None
            raise LabgateError(e.code, text) from None

    def _send(self, path, msg):
        if msg.get("experiment_id") is None and path != "/v1/readings":
            raise ValueError("experiment_id is required")
        with self._queue_lock:
            waiting = bool(self._queue)
        if not waiting:
            try:
                self._request("POST", path, msg)
                self._connected = True
                return True
            except LabgateError:
                raise
            except OSError as e:
                log.warning("labgate not reachable (%s); queued", e)
                self._connected = False
        # Kept in order behind what already waits; the oldest goes when it is full.
        with self._queue_lock:
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1
                log.error("offline queue full: oldest message dropped")
            self._queue.append((path, msg))
        return True

    def _drain_queue(self):
        while True:
            with self._queue_lock:
                if not self._queue:
                    return
                path, msg = self._queue[0]
            try:
                # The same event_id as before: a retry of a record the agent already
                # took is answered as a duplicate, not stored twice.
                self._request("POST", path, msg)
                self._connected = True
            except LabgateError as e:
                log.error("labgate refused a queued message for good: %s", e)
            except OSError:
                self._connected = False
                return
            with self._queue_lock:
                if self._queue and self._queue[0][1] is msg:
                    self._queue.popleft()

    def _start_threads(self):
        names = {t.name for t in self._threads if t.is_alive()}
        if "labgate-sender" not in names:
            t = threading.Thread(target=self._sender, name="labgate-sender", daemon=True)
            t.start()
            self._threads.append(t)
        if self._handlers and "labgate-commands" not in names:
            t = threading.Thread(target=self._commands, name="labgate-commands", daemon=True)
            t.start()
            self._threads.append(t)

    def _sender(self):
        while not self._stop.wait(1.0):
            self._drain_queue()

    def _commands(self):
        backoff = 0.5
        while not self._stop.is_set():
            try:
                if self.device_id is None:
                    self.device_id = self._request("GET", "/v1/whoami").get("device")
                self._stream()
                backoff = 0.5
            except LabgateError as e:
                log.error("command stream refused: %s", e)
                backoff = 5.0
            except (OSError, http.client.HTTPException, ValueError) as e:
                log.warning("command stream lost: %s", e)
            self._stream_open = False
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, 5.0)

    def _stream(self):
        u = urllib.parse.urlsplit(self.url)
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=30)
        path = f"{u.path}/v1/devices/{urllib.parse.quote(self.device_id)}/commands"
        headers = self._headers()
        headers["Accept"] = "text/event-stream"
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        if r.status != 200:
            raise LabgateError(r.status, r.read().decode(errors="replace"))
        self._stream_open = True
        self._connected = True
        event, data = None, []
        try:
            while not self._stop.is_set():
                raw = r.fp.readline()
                if not raw:
                    raise ConnectionError("the agent closed the command stream")
                line = raw.decode().rstrip("\r\n")
                if line == "":
                    if event == "command" and data:
                        self._dispatch(json.loads("\n".join(data)))
                    event, data = None, []
                elif line.startswith(":"):
                    continue
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())
        finally:
            conn.close()

    def _dispatch(self, cmd):
        name = cmd.get("command")
        handler = self._handlers.get(name)
        if handler is None:
            self._result(cmd, "failed", f"this application has no handler for {name!r}")
            return
        try:
            takes_arg = len(inspect.signature(handler).parameters) > 0
        except (TypeError, ValueError):
            takes_arg = True
        try:
            out = handler(cmd) if takes_arg else handler()
        except Exception as e:  # the application's failure is the command's result
            self._result(cmd, "failed", f"{type(e).__name__}: {e}")
            return
        self._result(cmd, "completed", out if isinstance(out, str) else f"{name} done")

    def _result(self, cmd, status, message):
        path = f"/v1/commands/{urllib.parse.quote(cmd['command_id'])}/result"
        try:
            self._request("POST", path, {"status": status, "message": message[:1000]})
        except (OSError, LabgateError) as e:
            log.error("result of %s not delivered: %s", cmd.get("command_id"), e)


# The name applications already import.
KafkaClient = LabgateClient
