"""TLS, mutual TLS and the token hello, against the real server (on uring and epoll), with
certificates issued by the `openssl` command as docs/operations.md shows."""

import asyncio
import subprocess
import threading

import pytest

import ringcall
from conftest import Server

TOKEN = "3b9f1c2d4e5a6b7c8d9e0f1a2b3c4d5e"


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for localhost, a client certificate for billing.internal,
    and a client certificate from another CA."""
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN={ca}", cwd=d)

    def issue(name, san, ca="ca"):
        openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", "-addext", f"subjectAltName={san}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-days", "2", "-copy_extensions", "copy", "-out", f"{name}.pem", cwd=d)

    issue("server", "DNS:localhost,IP:127.0.0.1")
    issue("billing", "DNS:billing.internal")
    issue("stranger", "DNS:stranger.internal", ca="other-ca")
    return d


@pytest.fixture(params=["uring", "epoll"])
def mtls_server(request, pki):
    s = Server(
        backend=request.param,
        extra=["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"), "--tls-client-ca", str(pki / "ca.pem")],
    )
    yield s
    s.stop()


@pytest.fixture(params=["uring", "epoll"])
def token_server(request, tmp_path):
    (tmp_path / "token").write_text(TOKEN + "\n")
    s = Server(backend=request.param, extra=["--token-file", str(tmp_path / "token")])
    yield s
    s.stop()


def test_the_blocking_client_speaks_mutual_tls_from_many_threads(mtls_server, pki):
    tls = ringcall.tls_context(str(pki / "ca.pem"), str(pki / "billing.pem"), str(pki / "billing.key"))
    with ringcall.Client(mtls_server.host, mtls_server.port, tls=tls, server_hostname="localhost") as client:
        assert client.ping()
        big = "z" * 300_000
        assert client.call(10000, {"big": big}) == {"big": big}
        results = {}

        def worker(n):
            results[n] = client.call_many([(10000, {"n": n, "i": i}) for i in range(200)])

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for n in range(8):
            assert results[n] == [{"n": n, "i": i} for i in range(200)]
    with ringcall.Pool(mtls_server.host, mtls_server.port, size=3, tls=tls, server_hostname="localhost") as pool:
        assert pool.call_many([(10000, {"i": i}) for i in range(50)]) == [{"i": i} for i in range(50)]


def test_a_client_without_a_trusted_certificate_is_refused(mtls_server, pki):
    anonymous = ringcall.tls_context(str(pki / "ca.pem"))
    stranger = ringcall.tls_context(str(pki / "ca.pem"), str(pki / "stranger.pem"), str(pki / "stranger.key"))
    for tls in (anonymous, stranger):
        with ringcall.Client(mtls_server.host, mtls_server.port, tls=tls, server_hostname="localhost", timeout=10) as client:
            # TLS 1.3 finishes the client's side of the handshake before the server has
            # checked its certificate: the refusal shows at the first call.
            with pytest.raises(ringcall.ConnectionError):
                client.ping()
    # A server certificate from a CA the client does not trust fails the handshake.
    distrust = ringcall.tls_context(str(pki / "other-ca.pem"), str(pki / "billing.pem"), str(pki / "billing.key"))
    with pytest.raises(ringcall.ConnectionError) as info:
        ringcall.Client(mtls_server.host, mtls_server.port, tls=distrust, server_hostname="localhost").ping()
    assert "certificate verify failed" in str(info.value)


def test_the_async_client_speaks_mutual_tls(mtls_server, pki):
    tls = ringcall.tls_context(str(pki / "ca.pem"), str(pki / "billing.pem"), str(pki / "billing.key"))

    async def main():
        async with ringcall.AsyncClient(mtls_server.host, mtls_server.port, tls=tls, server_hostname="localhost") as client:
            results = await asyncio.gather(*(client.call(10000, {"i": i}) for i in range(500)))
            assert results == [{"i": i} for i in range(500)]
            assert await client.ping()

    asyncio.run(main())


def test_the_token_is_presented_on_every_connection(token_server):
    with ringcall.Client(token_server.host, token_server.port, token=TOKEN) as client:
        assert client.call(10000, {"a": 1}) == {"a": 1}
        # A new connection (after this one is lost) presents it again.
        client._conn.sock.shutdown(2)
        with pytest.raises(ringcall.ConnectionError):
            client.ping()
        assert client.ping()
    with ringcall.Client(token_server.host, token_server.port, token="not-the-token-but-long-enough") as client:
        with pytest.raises(ringcall.ServerError) as info:
            client.ping()
        assert info.value.code == 401
        assert info.value.message == "the token is not this server's"
    with ringcall.Client(token_server.host, token_server.port) as client:
        with pytest.raises(ringcall.ServerError) as info:
            client.ping()
        assert info.value.code == 401

    async def main():
        async with ringcall.AsyncClient(token_server.host, token_server.port, token=TOKEN) as client:
            assert await client.call_many([(0, None), (10000, {"b": 2})]) == ["pong", {"b": 2}]
        async with ringcall.AsyncClient(token_server.host, token_server.port, token="not-the-token-but-long-enough") as client:
            with pytest.raises(ringcall.ServerError) as info:
                await client.ping()
            assert info.value.code == 401

    asyncio.run(main())
