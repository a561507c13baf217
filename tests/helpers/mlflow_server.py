"""A real ``mlflow server`` for end-to-end tests, started by ``scripts/mlflow_server.sh`` (the
documented command) in its own process group on a free port, and stopped with the whole group
(mlflow server runs uvicorn and its workers as children)."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.helpers.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "mlflow_server.sh"
ADMIN = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "admin-pw-for-tests-only"}


class Server:
    """``Server(folder, auth=...)``: ``start()`` waits until ``/health`` answers, ``stop()`` ends
    it; a stopped server starts again on the same port over the same database."""

    def __init__(self, folder: Path, *, auth: bool = False, port: int | None = None):
        self.folder, self.auth = folder, auth
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> Server:
        # One worker: each costs seconds of start-up on 2 busy cores, and the tests write from one process.
        env = {**os.environ, "PORT": str(self.port), "WORKERS": "1"}
        for key in ADMIN:
            env.pop(key, None)
        if self.auth:
            env.update(AUTH="1", MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN["MLFLOW_TRACKING_PASSWORD"])
        log = (self.folder / "server.log").open("ab")
        self.proc = subprocess.Popen(["bash", str(SCRIPT), str(self.folder)], env=env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    pass
            except OSError:
                time.sleep(0.5)
                continue
            if self.auth:
                self._sign_in()
            return self
        self.stop()
        raise TimeoutError(f"mlflow server did not answer within {timeout:.0f} s:\n{self.log()[-3000:]}")

    def _sign_in(self) -> None:
        """One signed-in request: the first check of a password is a scrypt hash (3-4 s on 2 busy
        cores, near the clients' 5 s timeout); the server caches it (AUTH_CACHE_TTL_S)."""
        token = base64.b64encode(f"{ADMIN['MLFLOW_TRACKING_USERNAME']}:{ADMIN['MLFLOW_TRACKING_PASSWORD']}".encode())
        request = urllib.request.Request(f"{self.uri}/api/2.0/mlflow/experiments/search?max_results=1",
                                         headers={"Authorization": f"Basic {token.decode()}"})
        with urllib.request.urlopen(request, timeout=60):
            pass

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            # uvicorn's graceful shutdown waits for the clients' keep-alive connections (measured
            # 20 s and more); every request here is committed, so 5 s then SIGKILL loses nothing.
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass
        # The port must be refused from here on (workers exit after the parent).
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1):
                    pass
            except OSError:
                break
            time.sleep(0.3)
        self.proc = None

    def log(self) -> str:
        return (self.folder / "server.log").read_text(errors="replace")
