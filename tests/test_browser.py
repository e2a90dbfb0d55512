"""What a user sees of the pipeline's records in MLflow's own UI, in a real browser: Debian's Chromium, headless,
driven by Selenium through Debian's ChromeDriver, against the live ``mlflow server`` of the shared tiny pipeline
(tests/conftest.py ``tracked_pipeline``: two searches, several retrains). The experiment page, the nested runs by
name, two searches compared node by node, a search's cell pictures by step, the registered model with its alias and
descriptions.
Every page's screenshot lands in test-output/browser/, taken when its check ends, passed or failed."""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait
from test_mlflow_server import ROOT, TrackedPipeline

from pipelines.full import summary

CHROMIUM = Path("/usr/bin/chromium")  # Debian's packages chromium and chromium-driver (.ci/run installs them)
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SHOTS = ROOT / "test-output" / "browser"
WAIT = 60  # seconds: a large single-page app, on a machine that may be busy with other tests
NODE_PARAM = re.compile(r"(normal|reduce)\.n\d+")  # one param per cell node: normal.n0, reduce.n1...
SLIDER = (By.CSS_SELECTOR, "[role=slider]")
T = TypeVar("T")


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """Headless Chromium through the system ChromeDriver, named explicitly so Selenium Manager never looks for (or
    downloads) a driver; a missing browser fails the tests, since a skip would hide that nothing was checked."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        pytest.fail(
            f"no browser for the UI tests: {', '.join(missing)} missing; install Debian's chromium and chromium-driver "
            "(apt-get install chromium chromium-driver, as .ci/run does)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(argument)
    options.add_argument("--no-proxy-server")  # the server is on 127.0.0.1
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()  # the browser, then the chromedriver process this fixture started (its own handle)


# ---------------------------------------------------------------------------------------------------- helpers


def _text(driver: WebDriver) -> str:
    """What the page shows as text (rendered, visible), which is what the checks compare."""
    return driver.find_element(By.TAG_NAME, "body").text


def _until(driver: WebDriver, what: str | Callable[[], str], condition: Callable[[WebDriver], T]) -> T:
    """Wait for what a user would wait for; a timeout fails with the page's URL and text, not a bare timeout."""
    wait = WebDriverWait(
        driver, WAIT, poll_frequency=0.5, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
    )
    try:
        return wait.until(condition)
    except TimeoutException:
        what = what if isinstance(what, str) else what()
        pytest.fail(
            f"not seen within {WAIT} s: {what}\nat {driver.current_url}, the page says:\n{_text(driver)[:3000]}"
        )


def _until_shown(driver: WebDriver, what: str, parts: list[str]) -> None:
    """Wait until every one of ``parts`` is in the page's visible text; fail naming the ones that never came."""

    def missing(d: WebDriver) -> list[str]:
        text = _text(d)
        return [part for part in parts if part not in text]

    _until(driver, lambda: f"{what}; missing: {missing(driver)}", lambda d: not missing(d))


def _shot(driver: WebDriver, name: str) -> None:
    """Keep what the browser showed, for a person to look at (test-output/browser/<name>.png)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


@contextmanager
def _page(driver: WebDriver, base: str, route: str, name: str) -> Iterator[None]:
    """Open ``#/route`` as a fresh page load (nothing left of the page before, whose text could pass for this one's),
    and screenshot it when the check ends, also when it fails."""
    driver.get("about:blank")
    driver.get(f"{base}/#/{route}")
    try:
        yield
    finally:
        _shot(driver, name)


def _route(driver: WebDriver) -> str:
    """The SPA's route: the URL's fragment without its query (``/experiments/1/runs``)."""
    return urllib.parse.urlsplit(driver.current_url).fragment.partition("?")[0]


def _markdown_lines(markdown: str) -> list[str]:
    """The text a description's Markdown shows: paragraphs without code marks, table rows as their cells in a row."""
    lines = []
    for block in re.split(r"\n\s*\n", markdown.strip()):
        rows = block.splitlines()
        if rows[0].startswith("|"):
            cells = [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in rows]
            lines += [" ".join(row) for row in cells if not all(set(cell) <= set("-: ") for cell in row)]
        else:
            lines.append(" ".join(block.replace("`", "").split()))
    return lines


def _records(tracked: TrackedPipeline) -> tuple[Any, str]:
    """(an MLflow client on the server, the pipeline's experiment id): what the pages must show comes from there."""
    from mlflow import MlflowClient

    uri = tracked.server.uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return client, client.get_experiment_by_name(tracked.result.experiment).experiment_id


def _search_runs(tracked: TrackedPipeline) -> list[str]:
    """The search runs' ids by seed, first order before second."""
    trials = sorted(tracked.result.trials, key=lambda trial: (trial.config.search.seed, trial.config.search.xi is None))
    return [tracked.result.search_runs[trial.trial] for trial in trials]


def _scroll_on(driver: WebDriver) -> None:
    """Scroll every scrolled box one screen further (back to the top at the end): charts are drawn when seen."""
    driver.execute_script(
        """for (const box of document.querySelectorAll('*')) {
             if (box.scrollHeight <= box.clientHeight + 4 || !/(auto|scroll)/.test(getComputedStyle(box).overflowY))
               continue;
             const end = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
             box.scrollTop = end ? 0 : box.scrollTop + box.clientHeight * 0.8;
           }"""
    )


def _card(driver: WebDriver, title: str) -> WebElement | None:
    """The chart card titled ``title`` that has a step slider (an image card), once drawn."""
    card = driver.execute_script(
        """const title = [...document.querySelectorAll('*')].find(
             e => e.childElementCount === 0 && e.textContent.trim() === arguments[0]);
           let card = title;
           while (card && !card.querySelector('[role=slider]')) card = card.parentElement;
           return card || null;""",
        title,
    )
    if card is None:
        _scroll_on(driver)
    return card


def _slide(driver: WebDriver, title: str, step: int) -> None:
    """Move the card's step slider to ``step`` as a user does from the keyboard: focus the thumb, press arrows."""

    def thumb() -> WebElement:
        return _until(driver, f"the step slider of {title!r}", lambda d: _card(d, title).find_element(*SLIDER))

    ActionChains(driver).click(thumb()).perform()
    for _ in range(20):
        now = round(float(thumb().get_attribute("aria-valuenow") or 0))
        if now == step:
            return
        ActionChains(driver).send_keys(Keys.ARROW_RIGHT if now < step else Keys.ARROW_LEFT).perform()
    pytest.fail(f"the step slider of {title!r} did not reach step {step}: it shows {now}")


def _row_text(driver: WebDriver, run_id: str) -> str:
    """The runs table's row of a run (ag-grid draws a row per pinned part, all with the run's id as row-id)."""
    return " ".join(part.text for part in driver.find_elements(By.CSS_SELECTOR, f"[row-id='{run_id}']"))


def _logged_image(driver: WebDriver, title: str, run_id: str, key: str, step: int) -> WebElement | None:
    """The card's ``<img>`` of the run's picture ``key`` at ``step`` (``images/<key>+step+<step>+...`` served by the
    server's get-artifact), once loaded."""
    card = _card(driver, title)
    for image in card.find_elements(By.TAG_NAME, "img") if card is not None else []:
        url = urllib.parse.urlsplit(image.get_attribute("src") or "")
        query = urllib.parse.parse_qs(url.query)
        if query.get("run_uuid") == [run_id] and query.get("path", [""])[0].startswith(f"images/{key}+step+{step}+"):
            loaded = driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image)
            return image if loaded else None
    return None


# ---------------------------------------------------------------------------------------------------- pages


def test_the_experiment_page_opens_on_its_runs(browser: WebDriver, tracked_pipeline: TrackedPipeline) -> None:
    """The link the pipeline prints (``experiment_url``) opens the experiment on its runs table in a browser that
    never opened MLflow before, not on the GenAI overview of traces that MLflow 3.17 shows by default."""
    from components.tracking import experiment_url

    client, experiment_id = _records(tracked_pipeline)
    assert client.get_experiment(experiment_id).tags.get("mlflow.experimentKind") == "custom_model_development"
    pipeline_name = client.get_run(tracked_pipeline.result.pipeline_run).info.run_name
    link = experiment_url(tracked_pipeline.server.uri, experiment_id)
    assert link in summary(tracked_pipeline.result)  # the link is the one the user is given
    base, _, route = link.partition("/#/")
    with _page(browser, base, route, "experiment"):
        # the page routes itself to a tab: .../runs (the table) or .../overview/... (GenAI)
        tab = _until(browser, "the experiment page's tab", lambda d: _route(d).partition(f"/{experiment_id}/")[2])
        assert tab == "runs", f"the experiment opened on {browser.current_url}, not on its runs"
        _until(browser, f"the runs table with the pipeline run {pipeline_name!r}", lambda d: pipeline_name in _text(d))


def test_the_runs_table_lists_the_nested_runs_by_name(browser: WebDriver, tracked_pipeline: TrackedPipeline) -> None:
    """Under the pipeline run, expanded, every search and retrain run shows its own name in its own row."""
    client, experiment_id = _records(tracked_pipeline)
    runs = client.search_runs([experiment_id])
    pipeline_run = tracked_pipeline.result.pipeline_run
    (pipeline,) = [run for run in runs if run.info.run_id == pipeline_run]
    stages = sorted(run.data.tags["raydarts.stage"] for run in runs)
    retrains = len(tracked_pipeline.result.retrain_runs)  # the candidates, random cells, baselines and champion
    assert stages == sorted(["pipeline", *["retrain"] * retrains, "search", "search", "selection"]) and retrains >= 5
    assert all(run.data.tags.get("mlflow.parentRunId") == pipeline_run for run in runs if run is not pipeline)
    with _page(browser, tracked_pipeline.server.uri, f"experiments/{experiment_id}/runs", "runs"):
        name = pipeline.info.run_name
        name_cell = f"//*[@row-id='{pipeline_run}']//*[@role='gridcell'][.//a[normalize-space()='{name}']]"
        cell = _until(browser, f"the pipeline run {name!r}", lambda d: d.find_element(By.XPATH, name_cell))
        cell.find_element(By.TAG_NAME, "button").click()  # the +: the nested runs
        for run in runs:
            name, run_id = run.info.run_name, run.info.run_id
            _until(browser, f"the run {name!r} in its row", lambda d, n=name, r=run_id: n in _row_text(d, r))


def test_the_compare_view_shows_two_searches_node_by_node(
    browser: WebDriver, tracked_pipeline: TrackedPipeline
) -> None:
    """Two searches side by side: each cell node is a param row (``normal.n0``...), with both runs' ops and inputs."""
    client, experiment_id = _records(tracked_pipeline)
    search_runs = _search_runs(tracked_pipeline)
    assert len(search_runs) == 2
    params = [client.get_run(run_id).data.params for run_id in search_runs]
    nodes = sorted(key for key in params[0] if NODE_PARAM.fullmatch(key))
    assert nodes == sorted(key for key in params[1] if NODE_PARAM.fullmatch(key))
    assert {"normal.n0", "normal.n1", "reduce.n0", "reduce.n1"} <= set(nodes)
    names = [client.get_run(run_id).info.run_name for run_id in search_runs]
    route = "compare-runs?" + urllib.parse.urlencode(
        {"runs": json.dumps(search_runs, separators=(",", ":")), "experiments": json.dumps([experiment_id])}
    )
    with _page(browser, tracked_pipeline.server.uri, route, "compare-searches"):
        # the run details table: a row per field or param (its name in <th>), a column per run, in the order asked for
        for label, values in [("Run Name:", names), *((key, [p[key] for p in params]) for key in nodes)]:
            path = f"//tr[th[normalize-space()='{label}']]"
            row = _until(browser, f"the row {label!r}", lambda d, path=path: d.find_element(By.XPATH, path))
            assert [cell.text for cell in row.find_elements(By.TAG_NAME, "td")] == values, label
            if label == nodes[0]:
                browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", row)


def test_a_search_run_shows_its_cell_pictures_by_step(browser: WebDriver, tracked_pipeline: TrackedPipeline) -> None:
    """The run's model-metrics charts have an image card per logged key (cell, alpha); its step slider shows the
    cell of each epoch, served by the server and loaded by the browser."""
    client, experiment_id = _records(tracked_pipeline)
    run_id = _search_runs(tracked_pipeline)[0]
    logged = [artifact.path for artifact in client.list_artifacts(run_id, "images")]
    steps = sorted({int(m[1]) for path in logged if (m := re.match(r"images/cell\+step\+(\d+)\+", path))})
    assert steps and any(path.startswith("images/alpha+step+") for path in logged)
    route = f"experiments/{experiment_id}/runs/{run_id}/model-metrics"
    with _page(browser, tracked_pipeline.server.uri, route, "search-run-pictures"):
        _until(browser, "the image card 'alpha'", lambda d: _card(d, "alpha"))
        card = _until(browser, "the image card 'cell'", lambda d: _card(d, "cell"))
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", card)
        _shot(browser, "search-run-pictures-as-opened")
        for step in steps:
            _slide(browser, "cell", step)
            image = _until(
                browser,
                f"the cell picture of step {step}",
                lambda d, s=step: _logged_image(d, "cell", run_id, "cell", s),
            )
            assert browser.execute_script("return arguments[0].naturalWidth", image) > 0
            browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", image)
            _shot(browser, f"search-run-cell-step-{step}")


def test_the_registered_model_shows_its_champion_and_descriptions(
    browser: WebDriver, tracked_pipeline: TrackedPipeline
) -> None:
    """The model page: its description and the version the alias ``champion`` points at; the version page: its
    description (the champion's result and its cell as a table) and the alias."""
    client, _ = _records(tracked_pipeline)
    name, number = tracked_pipeline.result.model_name, tracked_pipeline.result.model_version
    model, version = client.get_registered_model(name), client.get_model_version(name, number)
    assert model.aliases == {"champion": number} and model.description and version.description
    base = tracked_pipeline.server.uri
    with _page(browser, base, f"models/{urllib.parse.quote(name)}", "registered-model"):
        _until_shown(browser, "the model's description", _markdown_lines(model.description))
        row = f"//*[@role='row'][.//a[normalize-space()='Version {number}']]"
        shown = _until(browser, f"the row of version {number}", lambda d: d.find_element(By.XPATH, row).text)
        assert re.search(r"@\s*champion\b", shown), shown
    with _page(browser, base, f"models/{urllib.parse.quote(name)}/versions/{number}", "model-version"):
        _until_shown(browser, f"version {number}'s description", _markdown_lines(version.description))
        assert re.search(r"Aliases\s*:\s*@\s*champion\b", _text(browser)), _text(browser)[:3000]
