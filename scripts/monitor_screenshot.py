"""Screenshot of the swarm monitor's page with a 3-peer local swarm (the picture in the README: docs/monitor.png).

    python scripts/monitor_screenshot.py [--out docs/monitor.png] [--seconds 90]

Starts three `swarm-peer` processes of a random-weight 8-block Llama on 127.0.0.1, a `swarm-monitor` watching them,
lets it collect some history, and saves what headless Chromium shows. Also the browser helper of the tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from local_swarm import LocalSwarm  # noqa: E402
from model_tools import make_random_checkpoint  # noqa: E402
from service_process import ServiceProcess  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# What headless Chromium needs in a container as root, and nothing that reaches out to the internet by itself.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--lang=en-US",
]


def chromium_available() -> bool:
    return bool(shutil.which("chromium") or os.path.exists(CHROMIUM)) and bool(
        shutil.which("chromedriver") or os.path.exists(CHROMEDRIVER)
    )


def headless_chromium(width: int = 1280, height: int = 900, env: dict[str, str] | None = None):
    """A selenium WebDriver for Debian's Chromium with a fresh profile; quit() removes the profile too."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="blockswarm-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    service = Service(shutil.which("chromedriver") or CHROMEDRIVER, env={**os.environ, **(env or {})})
    driver = webdriver.Chrome(service=service, options=options)
    quit_driver = driver.quit

    def quit_and_clean() -> None:
        try:
            quit_driver()
        finally:
            shutil.rmtree(profile, ignore_errors=True)

    driver.quit = quit_and_clean
    return driver


class MonitorProcess(ServiceProcess):
    """A `swarm-monitor` subprocess (python -m swarm.monitor) on 127.0.0.1 with a free port."""

    def __init__(self, initial_peers: list[str], workdir: Path, args: list[str] | None = None):
        self.db_path = workdir / "monitor.sqlite3"
        cli = ["--initial-peers", *initial_peers, "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--port", "0"]
        super().__init__("swarm.monitor", "monitor", workdir, [*cli, "--db-path", str(self.db_path), *(args or [])])

    def wait_ready(self, timeout: float = 120.0) -> str:
        return super().wait_ready(timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "docs" / "monitor.png"))
    parser.add_argument("--seconds", type=float, default=90.0, help="history to collect before the screenshot")
    args = parser.parse_args()

    window = max(30.0, args.seconds)
    workdir = Path(tempfile.mkdtemp(prefix="blockswarm-monitor-shot-"))
    ckpt = make_random_checkpoint(workdir / "llama-8b-demo", "llama", seed=3, num_hidden_layers=8)
    timers = ["--announce-period", "2", "--record-ttl", "6", "--log-level", "WARNING"]
    swarm = LocalSwarm(ckpt, threads_per_peer=1, extra_args=timers, workdir=workdir)
    monitor = None
    driver = None
    try:
        swarm.start_peer((0, 5), ["--public-name", "alice"])
        swarm.start_peer((3, 8), ["--public-name", "bob", "--quant", "int8"], wait=False)
        swarm.start_peer((0, 4), ["--public-name", "<script>alert('carol')</script>"], wait=False)
        for peer in swarm.peers[1:]:
            swarm.wait_ready(peer)
        monitor = MonitorProcess(
            swarm.initial_peers,
            workdir,
            # buckets of 1.5 scrape periods: every bucket holds a look, so the timelines show no false gaps
            ["--scrape-period", "2", "--history-window", str(window), "--history-buckets", str(int(window / 3))],
        ).start()
        url = monitor.wait_ready()
        print(f"monitor at {url}; collecting {args.seconds:.0f} s of history", flush=True)
        time.sleep(args.seconds)
        driver = headless_chromium(1280, 900)
        driver.get(url)
        deadline = time.monotonic() + 30
        while not driver.execute_script("return document.body.dataset.generatedAt") and time.monotonic() < deadline:
            time.sleep(0.2)
        # the whole page, not just the first screen: headless windows do not grow, so the viewport is set instead
        height = int(driver.execute_script("return document.documentElement.scrollHeight"))
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": min(height, 3000), "deviceScaleFactor": 1, "mobile": False},
        )
        time.sleep(0.5)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(args.out)
        print(f"saved {args.out}")
    finally:
        if driver is not None:
            driver.quit()
        if monitor is not None:
            monitor.stop()
        swarm.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
