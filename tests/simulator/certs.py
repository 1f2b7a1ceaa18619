"""Test PKI for the simulator: a CA, a server certificate for 127.0.0.1/localhost, a client cert."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme

CLIENT_NAME = "device-rebind.client.test"


@dataclass(frozen=True)
class CertPaths:
    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def cert_paths(directory: str | Path) -> CertPaths:
    d = Path(directory)
    return CertPaths(
        directory=d,
        ca=d / "ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
    )


def generate_certs(directory: str | Path, *, overwrite: bool = True) -> CertPaths:
    """Write ca.pem, server.pem (+chain), server.key, client.pem (+chain), client.key into a dir.

    With ``overwrite=False`` an existing complete set is reused.
    """
    paths = cert_paths(directory)
    paths.directory.mkdir(parents=True, exist_ok=True)
    files = (paths.ca, paths.server_cert, paths.server_key, paths.client_cert, paths.client_key)
    if not overwrite and all(p.exists() for p in files):
        return paths
    ca = trustme.CA(organization_name="device-rebind test CA")
    server = ca.issue_cert("127.0.0.1", "localhost", "::1")
    client = ca.issue_cert(CLIENT_NAME)
    ca.cert_pem.write_to_path(str(paths.ca))
    _write_chain(server.cert_chain_pems, paths.server_cert)
    server.private_key_pem.write_to_path(str(paths.server_key))
    _write_chain(client.cert_chain_pems, paths.client_cert)
    client.private_key_pem.write_to_path(str(paths.client_key))
    for key in (paths.server_key, paths.client_key):
        key.chmod(0o600)
    return paths


def _write_chain(blobs: list[trustme.Blob], path: Path) -> None:
    path.write_bytes(b"".join(b.bytes() for b in blobs))
