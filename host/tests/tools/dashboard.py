"""Drives Riffle's dashboard in headless Chromium (Debian's chromium and chromium-driver,
through Selenium from PyPI) and prints what it saw as JSON:

    python3 dashboard.py URL SCREENSHOT.png

It waits for the page to update from the API, for every chart to have points and for the
counters to increase between two reads; it reports the browser console's errors and keeps a
screenshot. Waits are for events, bounded by a generous deadline, never timed sleeps."""
import json
import sys
import tempfile

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.support.ui import WebDriverWait

url, screenshot = sys.argv[1], sys.argv[2]
DEADLINE = 90

options = Options()
options.binary_location = "/usr/bin/chromium"
profile = tempfile.mkdtemp(prefix="riffle-chromium-")
# The flags keep a sandboxed, offline machine's Chromium from reaching for Google's services.
for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
             "--window-size=1366,900"]:
    options.add_argument(flag)
options.set_capability("goog:loggingPrefs", {"browser": "ALL"})


def check(driver):
    driver.get(url)
    wait = WebDriverWait(driver, DEADLINE, poll_frequency=0.2)
    updates = lambda d: int(d.find_element(By.TAG_NAME, "body").get_attribute("data-updates") or 0)
    wait.until(lambda d: updates(d) >= 1)

    def points(d):
        return {c.get_attribute("id"): int(c.get_attribute("data-points") or 0)
                for c in d.find_elements(By.TAG_NAME, "canvas")}

    wait.until(lambda d: all(n > 0 for n in points(d).values()))
    value = lambda d, id: int(d.find_element(By.ID, id).get_attribute("data-value") or 0)
    first = {"epoch": value(driver, "epoch"), "input_rows": value(driver, "input-rows")}
    wait.until(lambda d: value(d, "epoch") > first["epoch"] and value(d, "input-rows") > first["input_rows"])
    second = {"epoch": value(driver, "epoch"), "input_rows": value(driver, "input-rows")}
    operators = [r.get_attribute("data-operator")
                 for r in driver.find_elements(By.CSS_SELECTOR, "#graph rect")]
    udf_rows = len(driver.find_elements(By.CSS_SELECTOR, "#udfs tr")) - 1
    checkpoint_rows = len(driver.find_elements(By.CSS_SELECTOR, "#checkpoints tr")) - 1
    size = driver.execute_script(
        "return [document.documentElement.scrollWidth, window.innerWidth]")
    # The whole page in the screenshot, at the laptop width it was checked at.
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1366, max(900, height + 120))
    driver.save_screenshot(screenshot)
    console = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    print(json.dumps({
        "updates": updates(driver), "points": points(driver), "first": first,
        "second": second, "operators": operators, "udf_rows": udf_rows,
        "checkpoint_rows": checkpoint_rows, "status": driver.find_element(By.ID, "status").text,
        "scroll_width": size[0], "window_width": size[1], "console_errors": console,
    }))


driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
try:
    check(driver)
except TimeoutException:
    # Say what the page said: a script error is the usual reason it stopped updating.
    print("timed out; browser console:", json.dumps(driver.get_log("browser"), indent=1),
          file=sys.stderr)
    import urllib.request
    try:
        with urllib.request.urlopen(url + "api/query", timeout=5) as r:
            print("server answers:", r.read()[:200], file=sys.stderr)
    except Exception as e:
        print("server does not answer:", e, file=sys.stderr)
    print("status:", driver.find_element(By.ID, "status").text, file=sys.stderr)
    print("perf:", json.dumps(driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => [e.name, e.duration, e.responseEnd])")),
        file=sys.stderr)
    raise
finally:
    driver.quit()
