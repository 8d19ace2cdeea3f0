#!/usr/bin/env python3
"""Throwaway TLS certificates and SuperNode keys for a secured Flower deployment.

Writes, into ``OUT_DIR``:

* ``ca.crt`` / ``ca.key``: a self-signed certificate authority (ECDSA P-384);
* ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by the CA, valid
  for every ``--host`` given (IP addresses and DNS names in its subjectAltName);
* ``supernode-<name>`` / ``supernode-<name>.pub``: one ECDSA P-384 key pair per
  ``--node`` name, in OpenSSH format (what ``flower-supernode
  --auth-supernode-private-key`` and ``flwr supernode register`` read).

Only the ``cryptography`` package (a Flower dependency) is used: nothing is downloaded
and no ``openssl``/``ssh-keygen`` binary is needed. The certificates are meant for tests
and local trials (valid for 2 days); use your organisation's CA for a real federation.

Usage::

    python scripts/make_certs.py OUT_DIR --host 127.0.0.1 --host localhost \
        --node 0 --node 1 --node 2 --node stranger
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_FOR = dt.timedelta(days=2)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def make_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedunlearn test CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + VALID_FOR)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA384()))
    _write(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca.key", _pem_key(key), private=True)
    return cert, key


def make_server_cert(out: Path, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                     hosts: list[str]) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + VALID_FOR)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "server.key", _pem_key(key), private=True)


def make_node_key(out: Path, name: str) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    _write(out / f"supernode-{name}",
           key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption()), private=True)
    _write(out / f"supernode-{name}.pub",
           key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH) + b"\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--host", action="append", default=[],
                        help="IP or DNS name the SuperLink is reached at (repeatable; "
                             "default 127.0.0.1 and localhost)")
    parser.add_argument("--node", action="append", default=[],
                        help="name of a SuperNode key pair to create (repeatable)")
    args = parser.parse_args(argv)
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = make_ca(out)
    make_server_cert(out, ca_cert, ca_key, args.host or ["127.0.0.1", "localhost"])
    for name in args.node:
        make_node_key(out, name)


if __name__ == "__main__":
    main()
