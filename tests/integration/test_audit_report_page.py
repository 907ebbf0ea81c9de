"""The audit's HTML report as an auditor sees it: opened from a file in headless Chromium, offline.

Debian's chromium through its chromedriver (as the chat page test drives it); a screenshot is kept.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from appliance.audit.render import html_page
from tests.unit.test_audit_reports import make_report

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_report_page_in_headless_chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By

    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver")
    page = tmp_path / "audit-report.html"
    page.write_bytes(html_page(make_report()))

    monkeypatch.setenv("SE_OFFLINE", "true")  # never let selenium-manager try to download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,2000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    try:
        driver.get(page.as_uri())
        assert "Compliance audit: lab" in driver.title

        scores = driver.find_element(By.ID, "scores")
        assert scores.is_displayed()
        cis = scores.find_element(By.CSS_SELECTOR, 'tr.score[data-framework="cis-debian12-l1"]')
        assert "50.0%" in cis.text

        failing = driver.find_element(By.CSS_SELECTOR, 'article.control.fail[data-control="CIS-5.1.20"]')
        assert failing.is_displayed()
        text = failing.text
        assert "PermitRootLogin is yes, not no" in text
        assert "roles/base_hardening" in text  # the remediation
        assert "$ sshd -T | grep -i permitrootlogin" in text  # the evidence: command ...
        assert "exit 1" in text and "core-1" in text
        pre = failing.find_element(By.TAG_NAME, "pre")
        assert pre.is_displayed()
        assert "<script>alert('x')</script>" in pre.text  # ... and its output, shown as text, never run
        assert driver.execute_script("return document.scripts.length") == 0

        waived = driver.find_element(By.CSS_SELECTOR, 'article.control.waived[data-control="CIS-5.2.1"]')
        assert waived.is_displayed()
        justification = waived.find_element(By.CLASS_NAME, "justification")
        assert justification.text == "vendor tool breaks under a pty <b>until</b> v2 & later"
        assert waived.find_element(By.CLASS_NAME, "expires").text == "2026-03-20"
        assert "ciso@example.com" in waived.text

        error = driver.find_element(By.CSS_SELECTOR, 'article.control.error[data-control="MEM-TLS-1"]')
        assert "the host could not be reached" in error.text
        assert "not audited: ssh: timed out" in driver.find_element(By.ID, "targets").text
        assert "2" in driver.find_element(By.CSS_SELECTOR, "#cis-not-covered .count").text

        shot = tmp_path / "audit-report.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()

    data = shot.read_bytes()
    width, height = _png_size(data)
    assert width > 0 and height > 0
    assert len(data) > 10_000, "a screenshot of the whole report is not a few hundred bytes"
    for variable in ("MEMBRIA_ARTIFACTS", "MEMBRIA_TEST_ARTIFACTS"):
        artifacts = os.environ.get(variable)
        if artifacts:
            Path(artifacts).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, Path(artifacts) / "audit-report.png")
