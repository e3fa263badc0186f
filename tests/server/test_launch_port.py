"""The HTTP port is taken before the model loads: a busy port is a CLI error naming the flags,
at once, and nothing started meanwhile (expert-parallel ranks' sockets) can take the port."""

import socket
import time

from moeserve.cli import main
from moeserve.server.launch import bind_socket


def test_busy_port_is_a_flag_error_before_anything_loads(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.monotonic()
        code = main(["serve", "/nonexistent/model", "--host", "127.0.0.1", "--port", str(port)])
        took = time.monotonic() - start
    assert code == 2
    err = capsys.readouterr().err
    assert f"--host 127.0.0.1 --port {port}: cannot listen there" in err
    assert took < 5      # no model was looked for: /nonexistent/model would have failed otherwise


def test_bound_socket_holds_the_port_until_closed():
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    try:
        with socket.socket() as other:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                other.bind(("127.0.0.1", port))
                raised = False
            except OSError:
                raised = True
        assert raised
    finally:
        sock.close()
