"""The wire format (protocol v1): one JSON object per line each way.

A request is ``{"cmdid":N,"timestamp":T,"params":{...},"id":K}``; its reply is
``{"code":0,"id":K,"data":...}`` or ``{"code":C,"id":K,"error":"..."}``. Replies come back in
request order on a connection; the ``id`` is echoed, which is how a reply is checked against
the call it answers.
"""

import json
import time

from .errors import ProtocolError, ServerError

_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)

#: Codes after which the server closes the connection: 401 (a connection without the
#: server's token), 413 (a line over its limit: the stream is out of step) and 503 (over its
#: connection limit).
CLOSING_CODES = (401, 413, 503)


def encode_request(cmdid, params, call_id):
    """The request line for one call, as bytes ending in ``\\n``."""
    if not isinstance(cmdid, int) or isinstance(cmdid, bool) or not 0 <= cmdid <= 0xFFFFFFFF:
        raise ValueError(f"cmdid must be an integer from 0 to 4294967295, got {cmdid!r}")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict (a JSON object), got {type(params).__name__}")
    request = {"cmdid": cmdid, "timestamp": int(time.time()), "params": params, "id": call_id}
    return (_ENCODER.encode(request) + "\n").encode("utf-8")


def decode_reply(line, cmdid, call_id):
    """The ``data`` of the reply ``line`` to call ``call_id``, or the error it carries."""
    try:
        reply = json.loads(line)
    except ValueError as e:
        raise ProtocolError(f"reply is not JSON ({e}): {line[:200]!r}") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("code"), int):
        raise ProtocolError(f"reply has no integer code: {line[:200]!r}")
    code = reply["code"]
    # An error the server could not tie to an id (a line too long to read, invalid JSON)
    # carries none; replies come in order, so it is this call's.
    if reply.get("id") != call_id and not (code != 0 and "id" not in reply):
        raise ProtocolError(
            f"reply out of order: expected the reply to id {call_id}, got id {reply.get('id')!r}"
        )
    if code != 0:
        raise ServerError(code, str(reply.get("error", "")), cmdid)
    return reply.get("data")
