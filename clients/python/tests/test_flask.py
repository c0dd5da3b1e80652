"""The use the tornado-TCP article describes: a web server keeps one global connection to the
service and calls it from its request handlers. Here a Flask app, served by werkzeug's
threaded server, answers concurrent HTTP requests by calling ringcall through one
module-global client; every HTTP response carries its own request's reply."""

import json
import threading
import urllib.request

import pytest

import ringcall

flask = pytest.importorskip("flask")
from werkzeug.serving import make_server  # noqa: E402  (werkzeug comes with flask)


def make_app(host, port):
    app = flask.Flask(__name__)
    # Created once, when the web server starts, and shared by every request thread.
    service = ringcall.Client(host, port)

    @app.route("/echo/<int:n>")
    def echo(n):
        data = service.call(10000, {"n": n, "who": flask.request.args.get("who", "")})
        return flask.jsonify(data)

    @app.route("/missing")
    def missing():
        try:
            service.call(4242)
        except ringcall.ServerError as e:
            return flask.jsonify({"code": e.code, "message": e.message}), 502
        return "unreachable", 500

    return app, service


def test_flask_handlers_share_one_global_client(server):
    app, service = make_app(server.host, server.port)
    web = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{web.server_port}"
    results, errors = {}, []

    def fetch(n):
        try:
            with urllib.request.urlopen(f"{base}/echo/{n}?who=caller{n}", timeout=30) as response:
                results[n] = json.loads(response.read())
        except Exception as e:
            errors.append((n, e))

    try:
        threads = [threading.Thread(target=fetch, args=(n,)) for n in range(64)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert results == {n: {"n": n, "who": f"caller{n}"} for n in range(64)}
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{base}/missing", timeout=30)
        assert info.value.code == 502
        assert json.loads(info.value.read()) == {"code": 404, "message": "unknown cmdid 4242"}
    finally:
        web.shutdown()
        service.close()
