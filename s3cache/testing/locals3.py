"""A local S3 endpoint on 127.0.0.1 for the demo, the tests and the benchmarks.

The server half runs moto's S3 implementation behind a small WSGI middleware that counts and logs every
S3 request, adds latency, injects faults on object GETs and denies access to chosen keys. It speaks HTTP/1.1
and keeps connections open between requests, as S3 does. It is started as its own process::

    python -m s3cache.testing.locals3 --port 0 --latency-ms 20

and prints ``LOCALS3 PORT <port>`` once it listens. The client half, :class:`LocalS3`, starts that process
and drives the control API under ``/_locals3/`` (which is never counted):

* ``GET /_locals3/stats`` -> ``{"requests": {"GET": n, ...}, "log": [record, ...], "faults": {kind: n, ...},
  "connections": n}``. A record is the JSON form of :class:`RequestRecord`: ``method``, ``path`` (URL-decoded),
  ``query``, ``range`` (the ``Range`` header or null), ``body_bytes`` (response body bytes written so far),
  ``connection`` (the number of the TCP connection) and ``fault`` (the kind injected, or null). ``connections``
  counts the distinct connections that carried S3 requests; fault kinds are ``slow_down``, ``dropped``,
  ``denied`` and ``trickled``.
* ``POST /_locals3/reset-stats`` zeroes the counts, the log, the fault counts and the connections.
* ``POST /_locals3/config`` with JSON ``{"latency_ms", "spike_every", "spike_ms", "fail_every", "drop_every",
  "trickle_every", "trickle_bytes_per_s", "deny"}`` replaces the whole configuration (absent, 0 or "" = off),
  restarts the fault counters and ends the trickles under way.
* ``POST /_locals3/reset`` zeroes the stats, restores the start-up configuration (``--latency-ms``, no
  faults) and deletes every bucket and object (through moto's ``POST /moto-api/reset``).

Faults apply to object GETs (``GET /bucket/key`` without a sub-resource such as ``?tagging``, with or without
a ``Range`` header), counted from the last ``config`` or ``reset``:

* every ``fail_every``-th one is answered ``503 SlowDown``;
* every ``drop_every``-th one sends its headers with the full ``Content-Length`` and the first half of the
  body, then closes the connection, so clients see a truncated body;
* every ``trickle_every``-th one sends its headers at once and its body at ``trickle_bytes_per_s`` (at least
  one byte at a time), to try a client's deadline per object. A trickle ends early, sending the rest at once,
  when the settings change (``config`` or ``reset``) or after 30 s; a client that gives up and closes the
  connection ends it too.

When several fire on the same GET, ``slow_down`` wins over ``dropped``, which wins over ``trickled``; only
answers with a body (200 or 206) of 2 bytes or more are dropped or trickled. Independently, any S3 request (of
any method) whose object key or listing prefix contains ``deny`` is answered ``403 AccessDenied``, as a
bucket policy denying that part of the bucket would.
"""

from s3cache.testing.client import ACCESS_KEY, REGION, SECRET_KEY, LocalS3
from s3cache.testing.faults import FAULT_KINDS, FaultConfig
from s3cache.testing.records import RequestRecord

__all__ = ["ACCESS_KEY", "FAULT_KINDS", "REGION", "SECRET_KEY", "FaultConfig", "LocalS3", "RequestRecord"]

if __name__ == "__main__":
    # Imported here only: moto loads in the server process, never in its clients.
    from s3cache.testing.server import main

    main()
