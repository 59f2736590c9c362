"""Cross-language check of Arbiter's ext_authz service.

A client that no one here wrote: the `envoy-data-plane` message classes
(generated from Envoy's own protos) over `grpcio`. Run by
`tests/ext_authz.rs::python_envoy_data_plane_client` (which `tests/run.sh`
runs after installing the packages):

    python3 tests/python/ext_authz_client.py HOST:PORT ALLOW_TOKEN DENY_TOKEN

Exits 0 when every expectation holds, 1 on a wrong answer, 2 when the server
cannot be reached.
"""

import json
import sys

import grpc
from envoy_data_plane.envoy.config.core.v3 import Address, SocketAddress
from envoy_data_plane.envoy.service.auth.v3 import (
    AttributeContext,
    AttributeContextHttpRequest,
    AttributeContextPeer,
    AttributeContextRequest,
    AuthorizationSyncStub,
    CheckRequest,
)


def request(method, path, token=None):
    headers = {
        ":authority": "docs.example.com",
        ":method": method,
        ":path": path,
        "user-agent": "python-envoy-data-plane",
    }
    if token:
        headers["authorization"] = "Bearer " + token
    return CheckRequest(
        attributes=AttributeContext(
            source=AttributeContextPeer(
                address=Address(socket_address=SocketAddress(address="10.1.2.3", port_value=40000))
            ),
            destination=AttributeContextPeer(
                address=Address(socket_address=SocketAddress(address="10.0.0.7", port_value=8080))
            ),
            request=AttributeContextRequest(
                http=AttributeContextHttpRequest(
                    id="1",
                    method=method,
                    path=path,
                    host="docs.example.com",
                    scheme="http",
                    protocol="HTTP/1.1",
                    headers=headers,
                )
            ),
        )
    )


def headers_of(options):
    return {option.header.key: option.header.value for option in options}


def main():
    address, allow_token, deny_token = sys.argv[1:4]
    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
    except grpc.FutureTimeoutError:
        print(f"cannot reach {address}", file=sys.stderr)
        return 2
    stub = AuthorizationSyncStub(channel)
    failures = []

    def expect(name, condition, detail):
        if not condition:
            failures.append(f"{name}: {detail}")

    path = "/tenants/acme/documents/acme-roadmap"
    allow = stub.check(request("PUT", path, allow_token))
    expect("allow status", allow.status.code == 0, allow.status)
    ok = allow.ok_response
    expect("allow is ok_response", ok is not None, allow)
    if ok is not None:
        headers = headers_of(ok.headers)
        expect("decision id header", headers.get("x-arbiter-decision-id"), headers)
        expect("principal header", headers.get("x-arbiter-principal") == "bob", headers)

    deny = stub.check(request("PUT", path, deny_token))
    expect("deny status", deny.status.code == 7, deny.status)
    denied = deny.denied_response
    expect("deny is denied_response", denied is not None, deny)
    if denied is not None:
        expect("deny is 403", int(denied.status.code) == 403, denied.status)
        body = json.loads(denied.body)
        expect("deny body", set(body) == {"decision_id", "decision", "reason"}, body)

    missing = stub.check(request("PUT", path))
    denied = missing.denied_response
    expect("missing token is 401", denied is not None and int(denied.status.code) == 401, missing)
    if denied is not None:
        headers = headers_of(denied.headers)
        expect("challenge", headers.get("www-authenticate", "").startswith("Bearer"), headers)

    for failure in failures:
        print("FAIL", failure, file=sys.stderr)
    if not failures:
        print("python envoy-data-plane client: allow, 403 and 401 as expected")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
