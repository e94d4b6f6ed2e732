"""HTTPS: ``fma serve --certfile --keyfile`` driven by the official openai client that trusts only a test CA."""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fma_common.procs import free_port

pytestmark = pytest.mark.process


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca_and_server_cert(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signed for 127.0.0.1 and localhost: (ca.pem, server.pem, server-key.pem)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("fma test CA")).issuer_name(_name("fma test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.pem", folder / "server.pem", folder / "server-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def test_fma_serve_over_https_with_a_client_that_trusts_only_our_ca(tmp_path: Path, tiny_model_dir: Path):
    ca, cert, key = make_ca_and_server_cert(tmp_path)
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  - {{name: tiny, source: 'path:{tiny_model_dir}'}}\n")
    port = free_port()
    fma = Path(sys.executable).with_name("fma")
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([str(fma), "serve", "--bind", f"127.0.0.1:{port}", "--models", str(models),
                             "--certfile", str(cert), "--keyfile", str(key)],
                            env={**os.environ, "FMA_WORKER_LOG_DIR": str(tmp_path / "logs")}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    trust = ssl.create_default_context(cafile=str(ca))  # our CA only: not the system's
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/ready", verify=trust, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                               http_client=httpx.Client(verify=trust, timeout=120))
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                             max_tokens=3, temperature=0)
        assert out.choices[0].finish_reason in ("stop", "length")
        stream = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, stream=True)
        assert sum(1 for _ in stream) >= 1
        with pytest.raises(openai.APIConnectionError):  # the system's trust store does not know our CA
            openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0).models.list()
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on that port
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).raise_for_status()
        assert f"requester on https://127.0.0.1:{port}" in (tmp_path / "serve.log").read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        log.close()
