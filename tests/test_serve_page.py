"""The page at GET / in a real browser (Debian's chromium, headless, driven by selenium): load
it, choose an image, and check that the answer is drawn: the label, the exit step and the boxes
on the canvas. Skipped where chromium, chromedriver or selenium is missing.

GLANCEFOCUS_PAGE_SCREENSHOT=FILE also saves a screenshot there (docs/assets/serve-page.png)."""
import os
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image
from test_serve import start, stop

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed "
                                "(pip install selenium, in the test extra)")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("chromium and chromedriver are not installed (Debian: apt-get install chromium "
                "chromium-driver)", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1100,760",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


def test_page_draws_the_answer(exported_demo, browser, tmp_path):
    _, folder = exported_demo
    process, url = start(folder)
    try:
        image = tmp_path / "canvas.png"
        rng = np.random.default_rng(5)
        Image.fromarray((rng.random((140, 180)) * 255).astype(np.uint8)).save(image)
        want = httpx.post(f"{url}/v1/predict?top_k=5", content=image.read_bytes(),
                          headers={"content-type": "image/png"}).json()
        browser.get(url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: "classes" in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "file").send_keys(str(image))
        wait.until(lambda d: d.find_element(By.ID, "result").get_attribute("data-drawn") == "1")
        assert want["class_name"] in browser.find_element(By.ID, "label").text
        assert browser.find_element(By.ID, "exit-step").text.startswith(f"{want['exit_step']} of")
        assert "for every step" in browser.find_element(By.ID, "macs").text
        # the canvas holds the image at its size (scaled) with the boxes drawn in colour
        drawn = browser.execute_script("""
            const c = document.getElementById('canvas'), ctx = c.getContext('2d');
            const d = ctx.getImageData(0, 0, c.width, c.height).data;
            let coloured = 0;
            for (let i = 0; i < d.length; i += 4)
                if (Math.max(d[i], d[i+1], d[i+2]) - Math.min(d[i], d[i+1], d[i+2]) > 60) coloured++;
            return [c.width, c.height, coloured];""")
        width, height, coloured = drawn
        assert abs(width / height - 180 / 140) < 0.02
        if len(want["boxes"]) > 1:  # focus patches are drawn in colour (the glance in white)
            assert coloured > 50
        screenshot = os.environ.get("GLANCEFOCUS_PAGE_SCREENSHOT")
        if screenshot:
            browser.save_screenshot(screenshot)
    finally:
        stop(process)
