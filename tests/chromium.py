"""A report as a reader sees it: headless Chromium renders an HTML file offline into a PNG screenshot.

``screenshot(html, png, tmp)`` returns the PNG's bytes, or skips the calling test when no Chromium is installed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def screenshot(html: Path, png: Path, tmp: Path, size: str = "1200,2400") -> bytes:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("no Chromium on this machine")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp / 'profile'}"]
    subprocess.run([exe, *flags, f"--window-size={size}", f"--screenshot={png}", Path(html).as_uri()],
                   check=True, capture_output=True, timeout=120)
    return png.read_bytes()
