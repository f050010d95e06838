"""The playground page, driven in headless Chromium against a real server:
pick an example, run it, watch progress reach 100 % and the image appear at
its natural size; cancel a long run; see validation errors name the node;
replay a task by id; fit a phone's width.

Needs Debian's chromium + chromium-driver (``scripts/browser`` installs them;
``scripts/test`` and ``.ci/run`` call it). Without them the tests skip, unless
``COMFY_EMBED_TEST_BROWSER=required`` (set by ``.ci/run``) makes that a failure.
Screenshots go to the test's temporary folder, and to docs/screenshots/ when
``COMFY_EMBED_UPDATE_SCREENSHOTS=1``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests

from tests.conftest import example
from tests.servers import Server

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "docs" / "screenshots"


def _browser_or_skip() -> tuple[str, str]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    reason = None
    if not (chromium and driver):
        reason = ("Debian's chromium and chromium-driver are not installed and scripts/browser "
                  "could not install them (needs root or sudo, and apt-get)")
    else:
        try:
            import selenium  # noqa: F401
        except ImportError:
            reason = "selenium is not installed (pip install -e '.[test]')"
    if reason:
        if os.environ.get("COMFY_EMBED_TEST_BROWSER") == "required":
            pytest.fail(reason + "; COMFY_EMBED_TEST_BROWSER=required")
        pytest.skip(reason)
    return str(chromium), str(driver)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    _browser_or_skip()
    srv = Server(tmp_path_factory.mktemp("page"),
                 apps_dir=ROOT / "comfy_embed" / "examples" / "apps")  # the bundled apps
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Any, str], Path]:
    folder = tmp_path_factory.mktemp("screenshots")

    def save(driver: Any, name: str) -> Path:
        path = folder / f"{name}.png"
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(path))
        _shrink(path)
        assert path.stat().st_size < 300_000, f"{path} is {path.stat().st_size} bytes"
        if os.environ.get("COMFY_EMBED_UPDATE_SCREENSHOTS") == "1":
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, SCREENSHOTS / path.name)
        return path
    return save


def _shrink(path: Path) -> None:
    """A 256-colour palette: screenshots stay small enough to commit."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


@pytest.fixture(scope="module")
def driver(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from selenium import webdriver

    chromium, chromedriver = _browser_or_skip()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,1000",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(arg)
    # An explicit driver path: Selenium Manager never tries to download one.
    drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=chromedriver))
    try:
        yield drv
    finally:
        drv.quit()


def _wait(driver: Any, condition: Callable[[Any], Any], timeout: float = 180, what: str = "") -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except Exception as e:
        state = driver.execute_script("return document.getElementById('state').textContent")
        error = driver.execute_script("return document.getElementById('error').textContent")
        raise AssertionError(f"waiting for {what}: {e!r}; state={state!r} error={error!r}") from e


def _state(driver: Any) -> str:
    return str(driver.find_element("id", "state").get_attribute("data-state"))


def _open(driver: Any, server: Server) -> None:
    driver.get(server.url + "/")
    _wait(driver, lambda d: d.execute_script(
        "return document.querySelectorAll('#example option').length") >= 3, 30, "examples")


def _set_workflow(driver: Any, graph: Any) -> None:
    text = graph if isinstance(graph, str) else json.dumps(graph, indent=2)
    editor = driver.find_element("id", "workflow")
    driver.execute_script("arguments[0].value = arguments[1];"
                          "arguments[0].dispatchEvent(new Event('input'));", editor, text)


def test_example_runs_with_progress_and_natural_size_image(driver: Any, server: Server,
                                                           shots: Callable[[Any, str], Path]) -> None:
    from selenium.webdriver.support.ui import Select

    _open(driver, server)
    Select(driver.find_element("id", "example")).select_by_value("image_only")
    Select(driver.find_element("id", "example")).select_by_value("text_to_image")
    loaded = json.loads(driver.find_element("id", "workflow").get_attribute("value"))
    assert loaded == example("text_to_image")
    assert "7 nodes, links resolve" in driver.find_element("id", "validation").text

    driver.find_element("id", "run").click()
    _wait(driver, lambda d: _state(d) == "success", what="success")

    assert driver.find_element("id", "progress").get_attribute("value") == "100"
    steps = example("text_to_image")["3"]["inputs"]["steps"]
    assert driver.find_element("id", "progress-text").text == f"100 % ({steps}/{steps})"
    img = driver.find_element("css selector", "#results img")
    _wait(driver, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                             img), 30, "image decoded")
    natural, shown = driver.execute_script(
        "const r = arguments[0].getBoundingClientRect();"
        "return [[arguments[0].naturalWidth, arguments[0].naturalHeight], [r.width, r.height]];", img)
    assert natural == [256, 256] and shown == [256, 256]
    # Seeds up to 2^64 shown and put back digit for digit (JS numbers stop at 2^53).
    task_id = driver.find_element("id", "task-id").text
    seed = server.wait_final(task_id)[-1]["data"]["seeds"]["3"]
    assert f"node 3 (KSampler): {seed}" in driver.find_element("id", "seeds").text
    driver.find_element("css selector", "#seeds button").click()
    assert f'"seed": {seed},' in driver.find_element("id", "workflow").get_attribute("value")
    link = driver.find_element("css selector", "#results a[download]")
    assert link.get_attribute("download").endswith(".png")
    assert "node 9" in driver.find_element("css selector", "#results figcaption").text
    shots(driver, "playground")

    # The same task, replayed from its status log by id.
    assert task_id.startswith("pg-")
    driver.find_element("id", "lookup-id").clear()
    driver.find_element("id", "lookup-id").send_keys(task_id)
    driver.find_element("id", "lookup").click()
    _wait(driver, lambda d: _state(d) == "success" and d.find_elements("css selector", "#results img"),
          30, "replayed success")
    assert driver.find_element("id", "task-id").text == task_id
    assert int(driver.find_element("id", "event-count").text) > steps


def test_cancel_a_long_run_with_the_keyboard(driver: Any, server: Server,
                                            shots: Callable[[Any, str], Path]) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    _open(driver, server)
    long = example("text_to_image")
    long["3"]["inputs"]["steps"] = 500
    # Another client's long task runs first: the page's task waits behind it.
    r = server.run(long, headers={"X-Fc-Invocation-Type": "Async", "X-Task-Id": "other-client"})
    assert r.status_code == 202, r.text
    _set_workflow(driver, long)
    editor = driver.find_element("id", "workflow")
    editor.click()
    ActionChains(driver).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(Keys.CONTROL).perform()
    _wait(driver, lambda d: _state(d) == "queued" and d.find_element("id", "queue").text == "1 ahead",
          60, "queued behind the other task")
    cancelled = requests.post(server.url + "/api/serverless/cancel",
                              params={"task_id": "other-client"}, timeout=10)
    assert cancelled.status_code == 200, cancelled.text
    _wait(driver, lambda d: d.find_element("id", "progress-text").text.endswith("/500)"), 120,
          "sampler progress")
    assert _state(driver) == "running"
    ActionChains(driver).send_keys(Keys.ESCAPE).perform()
    _wait(driver, lambda d: _state(d) == "cancelled", 60, "cancelled")
    assert "execution_interrupted" in driver.find_element("id", "error").text
    done = int(driver.find_element("id", "progress").get_attribute("value"))
    assert done < 100
    assert driver.find_element("id", "cancel").get_attribute("disabled") is not None
    shots(driver, "playground-cancelled")


def test_validation_errors_name_the_node_and_input(driver: Any, server: Server, tmp_path: Path,
                                                   shots: Callable[[Any, str], Path]) -> None:
    _open(driver, server)
    # A workflow file picked from disk replaces the editor's text.
    picked = tmp_path / "picked.json"
    picked.write_text(json.dumps(example("image_only")))
    driver.find_element("id", "file").send_keys(str(picked))
    _wait(driver, lambda d: '"EmptyImage"' in d.find_element("id", "workflow").get_attribute("value"),
          10, "picked file in the editor")
    assert "3 nodes, links resolve" in driver.find_element("id", "validation").text

    _set_workflow(driver, '{"3": {"class_type": "KSampler", "inputs": {"seed": 1,}}}')
    _wait(driver, lambda d: "Not valid JSON" in d.find_element("id", "validation").text, 10,
          "JSON error message")
    assert "line 1" in driver.find_element("id", "validation").text
    assert driver.find_element("id", "workflow").get_attribute("aria-invalid") == "true"

    _set_workflow(driver, {"3": {"class_type": "VAEDecode", "inputs": {"samples": ["99", 0]}}})
    _wait(driver, lambda d: "links to node 99" in d.find_element("id", "validation").text, 10,
          "dangling link message")
    assert "node 3 (VAEDecode) input 'samples'" in driver.find_element("id", "validation").text

    bad = example("text_to_image")
    bad["4"]["inputs"]["ckpt_name"] = "no-such-model.safetensors"
    _set_workflow(driver, bad)
    driver.find_element("id", "run").click()
    _wait(driver, lambda d: _state(d) == "error", 60, "error")
    error = driver.find_element("id", "error").text
    assert "node 4 (CheckpointLoaderSimple) input ckpt_name" in error, error
    assert "no-such-model.safetensors" in error
    shots(driver, "playground-error")


def test_phone_width_has_no_horizontal_scroll(driver: Any, server: Server,
                                              shots: Callable[[Any, str], Path]) -> None:
    driver.set_window_size(390, 844)
    try:
        _open(driver, server)
        overflow = driver.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0
        # One column: the task panel sits below the workflow panel.
        tops = driver.execute_script(
            "return [...document.querySelectorAll('section.panel')].map(s => s.getBoundingClientRect().top)")
        assert tops[1] > tops[0]
        shots(driver, "playground-phone")
    finally:
        driver.set_window_size(1280, 1000)


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    _browser_or_skip()
    srv = Server(tmp_path_factory.mktemp("page-auth"), api_keys="page-test-key")
    try:
        yield srv.wait_ready(headers={"X-Api-Key": "page-test-key"})
    finally:
        srv.stop()


def test_with_authentication_the_page_loads_and_asks_for_the_key(driver: Any, keyed_server: Server,
                                                                 shots: Callable[[Any, str], Path]) -> None:
    from selenium.webdriver.support.ui import Select

    assert keyed_server.run(example("image_only")).status_code == 401
    _open(driver, keyed_server)  # the page and its examples need no key
    driver.execute_script("sessionStorage.clear()")
    driver.find_element("id", "api-key").clear()
    Select(driver.find_element("id", "example")).select_by_value("image_only")
    driver.find_element("id", "run").click()
    _wait(driver, lambda d: _state(d) == "error", 60, "refused without a key")
    assert "requires an API key" in driver.find_element("id", "error").text
    assert driver.execute_script("return document.activeElement.id") == "api-key"
    shots(driver, "playground-key")

    driver.find_element("id", "api-key").send_keys("page-test-key")
    driver.find_element("id", "run").click()
    _wait(driver, lambda d: _state(d) == "success", 120, "success with the key")
    assert len(driver.find_elements("css selector", "#results img")) == 2
    task_id = driver.find_element("id", "task-id").text

    # The task is readable with the key that created it, and not without one.
    driver.find_element("id", "lookup").click()
    _wait(driver, lambda d: _state(d) == "success" and d.find_elements("css selector", "#results img"),
          30, "replayed with the key")
    driver.find_element("id", "api-key").clear()
    driver.find_element("id", "lookup").click()
    _wait(driver, lambda d: _state(d) == "error", 30, "replay refused without the key")
    assert driver.find_element("id", "task-id").text == task_id
    assert "requires an API key" in driver.find_element("id", "error").text


def test_app_form_runs_an_app_with_its_parameters(driver: Any, server: Server) -> None:
    """An app picked from the list gets a form built from its parameters'
    schema (number bounds, defaults); Run streams it like any workflow."""
    from selenium.webdriver.support.ui import Select

    _open(driver, server)
    _wait(driver, lambda d: d.execute_script(
        "return document.querySelectorAll('#app option').length") >= 3, 30, "apps")
    Select(driver.find_element("id", "app")).select_by_value("text-to-image")
    assert driver.find_element("id", "app-form").is_displayed()
    assert driver.find_element("id", "workflow").get_attribute("disabled") is not None
    steps = driver.find_element("id", "app-param-steps")
    assert steps.get_attribute("max") == "50" and steps.get_attribute("value") == "4"
    prompt = driver.find_element("id", "app-param-prompt")
    prompt.clear()
    prompt.send_keys("a red fox in the snow")
    seed = driver.find_element("id", "app-param-seed")
    seed.clear()
    seed.send_keys("5")
    driver.find_element("id", "run").click()
    _wait(driver, lambda d: _state(d) == "success", what="app success")
    assert "node 3: 5" in driver.find_element("id", "seeds").text
    img = driver.find_element("css selector", "#results img")
    _wait(driver, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                             img), 30, "image decoded")
    Select(driver.find_element("id", "app")).select_by_value("")
    assert not driver.find_element("id", "app-form").is_displayed()
