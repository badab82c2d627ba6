"Shared by the browser tests: Debian's Chromium driven by Python Playwright, and what a missing piece does."
import os

import pytest

CHROMIUM = "/usr/bin/chromium"  # Debian's package (never `playwright install`)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def required() -> bool:
    "Under CI or `make test` (FLUX2_KIT_REQUIRE_CHROMIUM=1) a missing browser piece fails the test instead of skipping it."
    return os.environ.get("CI", "").lower() in ("1", "true") or os.environ.get("FLUX2_KIT_REQUIRE_CHROMIUM") == "1"


def need(ok: bool, why: str):
    "Go on if `ok`; else fail (when required) or skip, saying `why`."
    if ok: return
    if required(): pytest.fail(why + " (required under CI)")
    pytest.skip(why)
