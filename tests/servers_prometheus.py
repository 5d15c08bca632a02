"""A real ``prometheus`` server on a free loopback port, scraping the given targets every
second; its HTTP API answers the tests' PromQL queries."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from servers import LOOPBACK, free_port


class PrometheusServer:
    def __init__(self, targets: list[str], folder: Path) -> None:
        binary = shutil.which("prometheus") or "/usr/bin/prometheus"
        self.port = free_port()
        self.folder = folder
        config = folder / "prometheus.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {"job_name": "workers", "static_configs": [{"targets": targets}]}
                    ],
                }
            )
        )
        self.log = folder / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={folder / 'data'}",
                    f"--web.listen-address={LOOPBACK}:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_ready()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready:\n{self.log.read_text()}")
            time.sleep(0.1)

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as answer:
            body = json.loads(answer.read())
        if body.get("status") != "success":
            raise AssertionError(f"prometheus answered {body}")
        return body["data"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[Any]:
        data = self.api("query_range", query=expr, start=start, end=end, step=step)
        result: list[Any] = data["result"]
        return result

    def last_scrape(self) -> float:
        """Unix time at which the latest scrape that Prometheus stored began (0 if none)."""
        result = self.api("query", query="max(timestamp(up))")["result"]
        return float(result[0]["value"][1]) if result else 0.0

    def targets_up(self) -> bool:
        active = self.api("targets")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
