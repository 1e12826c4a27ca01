"""The kernel process's own stdout/stderr (host_streams.py): a flush with nothing written does
not wait on the IOPub thread; written text still reaches IOPub in order."""
from __future__ import annotations

import time

import zmq
from ipykernel.iostream import IOPubThread
from jupyter_client.session import Session

from supermachine_kernel.kernel.host_streams import HostOutStream


def _stream_and_subscriber():
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    thread = IOPubThread(pub)
    thread.start()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{port}")
    time.sleep(0.3)  # the subscription reaches the PUB socket
    session = Session(key=b"k")
    stream = HostOutStream(session, thread, "stdout", watchfd=False)
    return ctx, thread, sub, session, stream


def _received(sub, session, wait_ms=2000):
    out = []
    while sub.poll(wait_ms):
        idents, msg = session.feed_identities(sub.recv_multipart())
        out.append(session.deserialize(msg))
        wait_ms = 200
    return out


def test_empty_flush_skips_the_iopub_thread_and_text_is_still_sent():
    ctx, thread, sub, session, stream = _stream_and_subscriber()
    try:
        scheduled = []
        schedule = thread.schedule
        thread.schedule = lambda f: (scheduled.append(f), schedule(f))[1]
        stream.flush()
        assert scheduled == []  # nothing written: no hand-off, no wait
        stream.write("hello ")
        stream.write("host\n")
        stream.flush()
        assert scheduled  # written text goes through the IOPub thread as before
        msgs = _received(sub, session)
        assert [(m["msg_type"], m["content"]["text"]) for m in msgs] == [("stream", "hello host\n")]
        scheduled.clear()
        stream.flush()
        assert scheduled == []  # and the buffer is empty again afterwards
    finally:
        stream.close()
        thread.stop()
        thread.close()
        sub.close(linger=0)
        ctx.term()
