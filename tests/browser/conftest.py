"""Fixtures: Debian's headless chromium, driven by Playwright for Python.

Playwright's own browser download is never used: the browser is the system's
/usr/bin/chromium (Debian package `chromium`; .ci/run installs it), with a
fresh temporary profile per test. Without it the tests fail and say how to
install it; they do not skip.
"""

from __future__ import annotations

import os
import shutil
from urllib.parse import urlsplit

import pytest

CHROMIUM = os.environ.get("GATEWAY_TEST_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path() -> str:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"{CHROMIUM} not found: the browser tests need Debian's chromium "
                    "(apt-get install chromium; .ci/run does it) or GATEWAY_TEST_CHROMIUM=/path/to/chromium",
                    pytrace=False)
    return CHROMIUM


def node_path() -> str:
    found = shutil.which("node")
    if found is None:
        pytest.fail("node not found: the admin page's JS tests run under `node --test` "
                    "(apt-get install nodejs; .ci/run does it)", pytrace=False)
    return found


@pytest.fixture
async def browser():
    """A headless chromium (launched with a fresh temporary profile), closed after the test."""
    from playwright.async_api import async_playwright

    path = chromium_path()
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=path, args=ARGS)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def page(browser):
    """A page in its own browser context. Kept for the test: the browser's errors (script
    errors, CSP violations; `page.errors`), every URL asked for (`page.requested`) and every
    answer of 400 or more (`page.failed`, (status, path) pairs), so that a test can check
    the page stayed on its listener and saw only the refusals it provoked."""
    context = await browser.new_context(viewport={"width": 1280, "height": 1000})
    pg = await context.new_page()
    pg.errors = []
    pg.requested = []
    pg.failed = []

    def console(m):
        # A failed fetch is also logged as "Failed to load resource"; it is in `failed`.
        if m.type == "error" and not m.text.startswith("Failed to load resource"):
            pg.errors.append(m.text)

    def response(r):
        if r.status >= 400:
            pg.failed.append((r.status, urlsplit(r.url).path))

    pg.on("console", console)
    pg.on("response", response)
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("request", lambda r: pg.requested.append(r.url))
    try:
        yield pg
    finally:
        await context.close()
