"""The web console in a real browser: Debian's headless chromium driven by selenium through
Debian's chromium-driver (both by full path, nothing is downloaded) (issue 11).

A real node processes the real 20-slice series for two destinations: dcmtk's storescp as the
PACS, and a second storescp that refuses every association, so the job ends ``failed`` with a
reason. The browser, as a person would:

1. opens the overview and sees the failed job with its reason there (zero clicks), opens the
   job from it (one click);
2. finds the series in the series list, opens it and its job, and sees the preview image
   loaded, the seconds per stage and the send status of each destination;
3. clicks Reprocess without logging in: refused, and the job is unchanged;
4. logs in with a token, clicks Reprocess: the page shows the job queued or running.

A screenshot of the overview is saved (``DICOM_NODE_CONSOLE_SCREENSHOT=docs/console.png`` also
writes it there: that is how the one in the docs was made).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.support.dcmtk import storescp
from tests.support.http import TOKENS, Web, http_overrides, write_token_file
from tests.support.node import NodeProcess, send_with_storescu
from tests.support.polling import wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
        reason="no Debian chromium / chromium-driver",
    ),
]

RULE = {
    "name": "thick-ct",
    "match": {"modality": ["CT"], "spacing_mm": [1.5, 10]},
    "action": {"target_spacing_mm": 1.0, "destinations": ["pacs", "archive"], "priority": 5},
}


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a browser or driver
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1750", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(5)
    try:
        yield driver
    finally:
        driver.quit()


def _text(driver, css: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css).text


def _click_link(driver, text: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.LINK_TEXT, text).click()


def test_console_in_a_browser(tmp_path, sample_data, browser):

    token_file = write_token_file(tmp_path, "alice")
    files = sorted(Path(sample_data.ct_dicom_repaired).glob("*.dcm"))
    with (
        storescp(tmp_path / "pacs", ae_title="PACS") as pacs,
        storescp(tmp_path / "archive", ae_title="ARCHIVE", extra_args=["--refuse"]) as archive,
    ):
        overrides = {
            **http_overrides(token_file),
            "completion": {"quiet_seconds": 1, "check_interval_s": 0.3},
            "rules": [RULE],
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port},
                {
                    "name": "archive",
                    "ae_title": "ARCHIVE",
                    "host": "127.0.0.1",
                    "port": archive.port,
                },
            ],  # fmt: skip
            "model": {"device": "cpu"},
        }
        with NodeProcess(tmp_path / "node", overrides=overrides) as node:
            web = Web(node)
            web.wait_ready()
            assert len(send_with_storescu(files, node.port).acknowledged) == 20
            failed = wait_until(
                lambda: web.get("/api/jobs?state=failed").json()["jobs"], 300, "a failed job"
            )
            job_id, series_uid = failed[0]["id"], failed[0]["source_series_uid"]
            _browse(browser, web.base, job_id, series_uid, tmp_path)
            # The page said so, and so does the database.
            assert web.get(f"/api/jobs/{job_id}").json()["state"] in ("queued", "running")


def _browse(driver, base: str, job_id: int, series_uid: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    # 1. The overview shows the failed job and its reason; one click opens it.
    driver.get(base + "/")
    failed = _text(driver, "#failed-jobs")
    assert f"job {job_id}" in failed
    assert "send failed permanently: archive" in failed
    driver.find_element(By.CSS_SELECTOR, f'#failed-jobs a[href="/jobs/{job_id}"]').click()
    assert _text(driver, "#job-state") == "failed"
    assert "archive" in _text(driver, "#job-reason")

    # 2. Series list -> series -> its job: preview, stage seconds, sends per destination.
    _click_link(driver, "Series")
    driver.find_element(By.CSS_SELECTOR, f'#series a[href="/series/{series_uid}"]').click()
    assert series_uid in driver.find_element(By.TAG_NAME, "h1").text
    driver.find_element(By.CSS_SELECTOR, f'#series-jobs a[href="/jobs/{job_id}"]').click()
    image = driver.find_element(By.ID, "preview")
    wait_until(
        lambda: driver.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", image
        ),
        30,
        "the preview image to load",
    )
    assert driver.execute_script("return arguments[0].naturalHeight", image) > 100
    stages = _text(driver, "#stages")
    assert "inference" in stages and "write" in stages
    sends = _text(driver, "#sends")
    n_out = (
        driver.execute_script("return document.querySelector('#sends tbody tr td.num').textContent")
        .split("/")[1]
        .strip()
    )
    assert f"pacs {n_out} / {n_out}" in sends and f"archive 0 / {n_out}" in sends
    assert "rejected" in sends.lower()

    # 3. Reprocess without logging in is refused; the job stays failed.
    driver.find_element(By.ID, "reprocess").click()
    assert "authentication required" in _text(driver, "#message")
    driver.get(f"{base}/jobs/{job_id}")
    assert _text(driver, "#job-state") == "failed"

    # 4. Log in with the token; the overview (screenshot) then Reprocess.
    driver.find_element(By.ID, "login").click()
    driver.find_element(By.ID, "token").send_keys(TOKENS["alice"])
    driver.find_element(By.ID, "login-submit").click()
    assert _text(driver, "#who") == "alice"
    driver.get(base + "/")
    shot = tmp_path / "console.png"
    assert driver.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("DICOM_NODE_CONSOLE_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["DICOM_NODE_CONSOLE_SCREENSHOT"])
    driver.get(f"{base}/jobs/{job_id}")
    driver.find_element(By.ID, "reprocess").click()
    assert f"requeued job {job_id}" in _text(driver, "#flash")
    assert _text(driver, "#job-state") in ("queued", "running")
