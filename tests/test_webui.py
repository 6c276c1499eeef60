"""The chat page at `/` (utils/server/webui.py), driven in a real headless Chromium through Selenium against a real
serve.py subprocess: streamed answers, images (picker, drop, paste), audio files, the microphone (a fake one
that plays examples/green_triangle.wav), spoken answers, transcription with subtitles, the API key, errors in
the server's words, the Content-Security-Policy, and no request to any other host (the browser's network log).

Debian's `chromium` and `chromium-driver` packages are used, never a downloaded browser. Without them the module
skips with the reason, and fails under CI (the CI variable set), where .ci/run installs them.
"""
from __future__ import annotations

import base64
import html.parser
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests import test_serve
from tests.conftest import EXAMPLES, REPO
from tests.test_serve import server
from utils.server import webui

pytestmark = test_serve.pytestmark

WAIT_S = 120  # the longest any DOM condition may take to come true (a loaded 2-core machine)
KEY = "webui-test-key"
GREEN_WAV = EXAMPLES / "green_triangle.wav"


def browser_paths() -> tuple[str, str]:
    """Debian's chromium and its chromedriver, or a skip (a failure under CI) saying which is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    missing = " and ".join(n for n, p in (("chromium", browser), ("chromedriver", driver)) if not p)
    message = f"{missing} not found (apt-get install chromium chromium-driver)"
    if os.environ.get("CI"):
        pytest.fail(message + ": required when CI is set")
    pytest.skip(message)


@pytest.fixture(scope="module")
def srv() -> Iterator[str]:
    with server() as served:
        yield served.base


@pytest.fixture(scope="module")
def keyed() -> Iterator[str]:
    """A server that needs the API key, with a 1 KiB body limit (an image is over it: 413)."""
    with server("--api_key", KEY, "--max_body_mb", "0.001") as served:
        yield served.base


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def driver(downloads: Path) -> Iterator[Any]:
    browser, chromedriver = browser_paths()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"selenium is not installed ({exc}): required when CI is set")
        pytest.skip(f"selenium is not installed ({exc})")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,860", "--no-first-run", "--disable-extensions", "--disable-sync",
                "--disable-background-networking", "--disable-component-update",
                "--autoplay-policy=no-user-gesture-required",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={GREEN_WAV.resolve()}%noloop"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    drv = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    try:
        drv.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        yield drv
    finally:
        drv.quit()


SEEN: list[dict] = []  # every Network.requestWillBeSent / responseReceived the page caused, for the checks below


def drain(drv: Any) -> None:
    """Read the browser's logs so far: every request the page made went to the origin of the page that made it (or
    was a data:/blob: URL), and the console shows no Content-Security-Policy violation."""
    for entry in drv.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] in ("Network.requestWillBeSent", "Network.responseReceived"):
            SEEN.append(message)
        if message["method"] != "Network.requestWillBeSent":
            continue
        url, page = message["params"]["request"]["url"], message["params"].get("documentURL", "")
        origin = "/".join(page.split("/")[:3]) + "/"
        assert origin.startswith("http://127.0.0.1:"), f"a page from {page}"
        assert url.startswith((origin, "data:", "blob:")), f"the page at {page} requested {url}"
    csp = [e["message"] for e in drv.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not csp, csp


@pytest.fixture(autouse=True)
def only_own_origin(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each browser test, its requests are checked (drain)."""
    yield
    if "driver" in request.fixturenames:
        drain(request.getfixturevalue("driver"))


# ---------------------------------------------------------------- page helpers

def wait(drv: Any, condition: Any, what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(drv, WAIT_S).until(lambda d: condition(d), message=f"waiting for {what}")


def open_page(drv: Any, base: str, card: bool = True) -> None:
    """Load the page; with `card`, wait until its script has read the model card (the page is live)."""
    drv.get(f"{base}/")
    if card:
        wait(drv, lambda d: d.find_elements("css selector", "#model-card dd"), "the model card")


def by_id(drv: Any, name: str) -> Any:
    return drv.find_element("id", name)


def answer(drv: Any, index: int = -1) -> Any:
    """The assistant message `index`, once it has finished (done, stopped or failed)."""
    def finished(d: Any) -> Any:
        items = d.find_elements("css selector", "#messages li.msg.assistant")
        if not items or "pending" in items[index].get_attribute("class"):
            return False
        return items[index]
    return wait(drv, finished, "the answer to finish")


def answer_text(drv: Any, index: int = -1) -> str:
    return answer(drv, index).find_element("css selector", ".content").text


def ask(drv: Any, text: str) -> None:
    from selenium.webdriver.common.keys import Keys
    by_id(drv, "prompt").send_keys(text, Keys.ENTER)


def attach(drv: Any, path: Path, kind: str) -> None:
    by_id(drv, "file-input").send_keys(str(path.resolve()))
    wait(drv, lambda d: d.find_elements("css selector", f"#attachments li[data-kind={kind}]"), f"the {kind} chip")


def error_text(drv: Any) -> str:
    return wait(drv, lambda d: by_id(d, "error").is_displayed() and by_id(d, "error").text, "the error box")


# ---------------------------------------------------------------- the served page (no browser)

class Tags(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text = ""
        self.in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self.in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self.in_script = False

    def handle_data(self, data: str) -> None:
        if self.in_script:
            self.script_text += data.strip()


def test_page_headers_and_no_inline_code(srv: str) -> None:
    page = httpx.get(f"{srv}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = dict(d.strip().split(" ", 1) for d in page.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'self'" and policy["script-src"] == "'self'"
    assert policy["connect-src"] == "'self'" and policy["style-src"] == "'self'"
    assert policy["img-src"] == "'self' data: blob:" and policy["media-src"] == "'self' data: blob:"
    assert page.headers["x-content-type-options"] == "nosniff"
    tags = Tags()
    tags.feed(page.text)
    assert tags.script_text == "", "an inline script"
    assert all(not name.startswith("on") and name != "style" for _, attrs in tags.tags for name in attrs)
    assert "style" not in [t for t, _ in tags.tags]
    links = [attrs.get("src") or attrs.get("href") for t, attrs in tags.tags if t in ("script", "link")]
    assert sorted(links) == ["/webui/app.js", "/webui/style.css", "data:,"]
    for path, media in (("/webui/app.js", "text/javascript"), ("/webui/style.css", "text/css")):
        asset = httpx.get(f"{srv}{path}", timeout=30)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media)
        assert asset.headers["content-security-policy"] == webui.CSP
        assert asset.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(f"{srv}/webui/index.html", timeout=30).status_code == 404  # the listed files only


def test_no_webui_flag() -> None:
    with server("--no_webui") as served:
        base = served.base
        page = httpx.get(f"{base}/", timeout=30)
        assert page.status_code == 404 and page.json()["error"]["code"] == "not_found"
        assert httpx.get(f"{base}/webui/app.js", timeout=30).status_code == 404
        assert httpx.get(f"{base}/v1/models", timeout=30).status_code == 200


# ---------------------------------------------------------------- in the browser

def test_text_answer_streams(driver: Any, srv: str) -> None:
    open_page(driver, srv)
    assert by_id(driver, "model-name").text.startswith("muomni")
    card = driver.find_element("id", "model-card").text
    assert "components" in card and "thinker" in card
    details = httpx.get(f"{srv}/v1/models", timeout=30).json()["data"][0]["details"]  # --info, less the paths
    assert f"{details['parameters']:,}" in card and details["decode_kernel"] in card
    assert str(REPO) not in card and str(REPO) not in json.dumps(details)
    ask(driver, "What is 3 plus 4?")
    assert answer_text(driver) == "7"
    stats = answer(driver).find_element("css selector", ".stats").text
    assert "tokens" in stats and "TTFT" in stats, stats
    user = driver.find_elements("css selector", "#messages li.msg.user .content")
    assert [u.text for u in user] == ["What is 3 plus 4?"]
    assert by_id(driver, "prompt").get_attribute("value") == ""


def test_shift_enter_breaks_the_line_and_new_chat_clears(driver: Any, srv: str) -> None:
    from selenium.webdriver.common.keys import Keys
    open_page(driver, srv)
    box = by_id(driver, "prompt")
    box.send_keys("What is 3 plus 4?", Keys.SHIFT, Keys.ENTER, Keys.SHIFT)
    assert box.get_attribute("value") == "What is 3 plus 4?\n"
    assert not driver.find_elements("css selector", "#messages li")
    box.send_keys(Keys.ENTER)
    assert answer_text(driver) == "7"
    by_id(driver, "new-chat").click()
    assert not driver.find_elements("css selector", "#messages li")


def test_stop_cuts_the_answer(driver: Any, srv: str) -> None:
    """Stop aborts the request (AbortController): the browser holds the answer's response (DevTools' Fetch
    domain), so the answer is still pending when Stop is clicked, whatever the machine's speed."""
    open_page(driver, srv)
    driver.execute_cdp_cmd("Fetch.enable", {"patterns": [{"urlPattern": "*/v1/chat/completions",
                                                          "requestStage": "Response"}]})
    try:
        ask(driver, "What is 3 plus 4?")
        wait(driver, lambda d: by_id(d, "stop").is_enabled(), "Stop to be enabled")
        assert not by_id(driver, "send").is_enabled()
        by_id(driver, "stop").click()
        stopped = answer(driver)
        assert "stopped" in stopped.get_attribute("class")
        assert stopped.find_element("css selector", ".stats").text == "stopped"
    finally:
        driver.execute_cdp_cmd("Fetch.disable", {})
    assert not by_id(driver, "stop").is_enabled() and by_id(driver, "send").is_enabled()
    assert not by_id(driver, "error").is_displayed()
    ask(driver, "What is 3 plus 4?")
    assert answer_text(driver) == "7"


def test_phone_sized_window(driver: Any, srv: str, tmp_path: Path) -> None:
    """On a phone-sized window nothing is wider than the screen and the composer stays usable."""
    size = driver.get_window_size()
    driver.set_window_size(390, 844)
    try:
        open_page(driver, srv)
        ask(driver, "What is 3 plus 4?")
        assert answer_text(driver) == "7"
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        chat, side, prompt = (driver.execute_script("const r = document.querySelector(arguments[0])"
                                                    ".getBoundingClientRect(); return [r.top, r.bottom, r.width]", s)
                              for s in ("#chat", ".side", "#prompt"))
        assert side[0] >= chat[1] and prompt[2] >= 0.8 * 390, (chat, side, prompt)  # one column, full width
        for name in ("prompt", "send", "stop", "record", "speak"):
            box = driver.execute_script("const r = document.getElementById(arguments[0]).getBoundingClientRect(); "
                                        "return [r.left, r.right, r.width]", name)
            assert 0 <= box[0] and box[1] <= 390 and box[2] > 0, (name, box)
        driver.save_screenshot(str(tmp_path / "phone.png"))
    finally:
        driver.set_window_size(size["width"], size["height"])


def test_image_answer_and_screenshot(driver: Any, srv: str, tmp_path: Path) -> None:
    open_page(driver, srv)
    attach(driver, EXAMPLES / "red_circle.png", "image")
    by_id(driver, "send").click()
    assert answer_text(driver) == "a red circle"
    img = driver.find_element("css selector", "#messages li.msg.user .media img")
    assert img.get_attribute("src").startswith("data:image/png;base64,")
    assert driver.execute_script("return arguments[0].naturalWidth", img) > 0
    shot = driver.get_screenshot_as_png()
    (tmp_path / "webui.png").write_bytes(shot)
    if os.environ.get("MUOMNI_WRITE_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        (REPO / "docs" / "webui.png").write_bytes(shot)
    assert shot.startswith(b"\x89PNG")


# A file made in the page from bytes, handed over as a drag-and-drop or a paste, as a browser does with a real one.
HAND_OVER = """
const [b64, name, type, how, target] = arguments;
const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const data = new DataTransfer();
data.items.add(new File([bytes], name, {type}));
const event = how === "drop" ? new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true})
                             : new ClipboardEvent("paste", {clipboardData: data, bubbles: true, cancelable: true});
target.dispatchEvent(event);
"""


def test_drop_and_paste_images(driver: Any, srv: str) -> None:
    open_page(driver, srv)
    blue = base64.b64encode((EXAMPLES / "blue_square.png").read_bytes()).decode()
    driver.execute_script(HAND_OVER, blue, "blue_square.png", "image/png", "drop", by_id(driver, "messages"))
    wait(driver, lambda d: d.find_elements("css selector", "#attachments li[data-kind=image]"), "the dropped image")
    by_id(driver, "send").click()
    assert answer_text(driver) == "a blue square"
    red = base64.b64encode((EXAMPLES / "red_circle.png").read_bytes()).decode()
    driver.execute_script(HAND_OVER, red, "red_circle.png", "image/png", "paste", by_id(driver, "prompt"))
    wait(driver, lambda d: d.find_elements("css selector", "#attachments li[data-kind=image]"), "the pasted image")
    by_id(driver, "send").click()
    assert answer_text(driver) == "a red circle"


def test_audio_file_answer(driver: Any, srv: str) -> None:
    open_page(driver, srv)
    attach(driver, GREEN_WAV, "audio")
    by_id(driver, "send").click()
    assert answer_text(driver) == "a green triangle"


def test_microphone_recording_transcribed(driver: Any, srv: str, downloads: Path) -> None:
    """The fake microphone plays green_triangle.wav (1.4 s) once; record past its end, then transcribe what the
    browser recorded (webm/opus, decoded by the server through PyAV) and send it to the chat (as WAV)."""
    open_page(driver, srv)
    by_id(driver, "record").click()
    wait(driver, lambda d: by_id(d, "record").get_attribute("aria-pressed") == "true", "recording to start")
    wait(driver, lambda d: float(by_id(d, "record-time").text.split()[0]) >= 2.5, "2.5 s recorded")
    by_id(driver, "record").click()
    wait(driver, lambda d: by_id(d, "transcribe-recording").is_enabled(), "the recording")
    chip = wait(driver, lambda d: d.find_elements("css selector", "#attachments li[data-kind=audio]"), "its chip")
    assert "recording.wav" in chip[0].text
    by_id(driver, "transcribe-recording").click()
    wait(driver, lambda d: by_id(d, "transcript-text").text, "the transcript")
    assert by_id(driver, "transcript-text").text == "a green triangle"
    segments = driver.find_elements("css selector", "#transcript-segments li")
    assert segments and all("→" in s.find_element("css selector", ".time").text for s in segments)
    assert "recording.webm" in by_id(driver, "transcript-status").text
    by_id(driver, "download-vtt").click()
    vtt = downloads / "recording.vtt"
    wait(driver, lambda d: vtt.is_file() and vtt.read_text().strip(), "the .vtt download")
    assert vtt.read_text().startswith("WEBVTT") and "a green triangle" in vtt.read_text()
    by_id(driver, "download-srt").click()
    srt = downloads / "recording.srt"
    wait(driver, lambda d: srt.is_file() and srt.read_text().strip(), "the .srt download")
    assert " --> " in srt.read_text() and "a green triangle" in srt.read_text()
    by_id(driver, "send").click()
    assert answer_text(driver) == "a green triangle"


def test_uploaded_file_transcribed(driver: Any, srv: str) -> None:
    open_page(driver, srv)
    by_id(driver, "transcribe-file").send_keys(str(GREEN_WAV.resolve()))
    wait(driver, lambda d: by_id(d, "transcript-text").text, "the transcript")
    assert by_id(driver, "transcript-text").text == "a green triangle"
    assert by_id(driver, "transcript-status").text == "green_triangle.wav: 1.40 s of audio"


def test_spoken_answer_plays(driver: Any, srv: str) -> None:
    open_page(driver, srv)
    by_id(driver, "speak").click()
    ask(driver, "What is 3 plus 4?")
    assert answer_text(driver) == "7"
    player = wait(driver, lambda d: d.find_elements("css selector", "#messages li.msg.assistant audio"),
                  "the player")[0]
    assert player.get_attribute("src").startswith("blob:")
    wait(driver, lambda d: d.execute_script("return arguments[0].duration", player) > 0, "the audio's duration")
    started = driver.execute_async_script(
        "const [a, done] = arguments; a.play().then(() => done('playing'), (e) => done(`${e.name}: ${e.message}`));",
        player)
    assert started == "playing"
    wait(driver, lambda d: d.execute_script("return arguments[0].currentTime", player) > 0, "playback")


def test_api_key_and_server_errors(driver: Any, keyed: str) -> None:
    open_page(driver, keyed, card=False)
    refused = "401: missing or wrong API key (send 'Authorization: Bearer KEY')"
    assert error_text(driver) == refused  # the model card itself needs the key
    ask(driver, "What is 3 plus 4?")
    assert "failed" in answer(driver).get_attribute("class")
    assert error_text(driver) == refused
    key = by_id(driver, "api-key")
    key.send_keys(KEY)
    ask(driver, "What is 3 plus 4?")
    assert answer_text(driver) == "7"
    assert not by_id(driver, "error").is_displayed()
    assert driver.execute_script("return localStorage.getItem('muomni.apiKey')") is None  # not asked to keep it
    by_id(driver, "remember-key").click()
    assert driver.execute_script("return localStorage.getItem('muomni.apiKey')") == KEY
    open_page(driver, keyed)
    assert by_id(driver, "api-key").get_attribute("value") == KEY
    by_id(driver, "remember-key").click()
    assert driver.execute_script("return localStorage.getItem('muomni.apiKey')") is None
    attach(driver, EXAMPLES / "red_circle.png", "image")
    by_id(driver, "send").click()
    assert "failed" in answer(driver).get_attribute("class")
    assert error_text(driver).startswith("413: the request body")


def test_network_log_seen(driver: Any, srv: str) -> None:
    """The origin check reads a real log: the page's own loads and the streamed chat request are in it."""
    SEEN.clear()
    open_page(driver, srv)
    ask(driver, "What is 3 plus 4?")
    assert answer_text(driver) == "7"
    drain(driver)
    urls = [m["params"]["request"]["url"] for m in SEEN if m["method"] == "Network.requestWillBeSent"]
    assert f"{srv}/" in urls and f"{srv}/webui/app.js" in urls and f"{srv}/v1/models" in urls
    chats = [m["params"]["request"] for m in SEEN if m["method"] == "Network.requestWillBeSent"
             and m["params"]["request"]["url"] == f"{srv}/v1/chat/completions"]
    assert len(chats) == 1 and json.loads(chats[0]["postData"])["stream"] is True
    streamed = [m["params"]["response"] for m in SEEN if m["method"] == "Network.responseReceived"
                and m["params"]["response"]["url"] == f"{srv}/v1/chat/completions"]
    assert len(streamed) == 1 and streamed[0]["status"] == 200 and streamed[0]["mimeType"] == "text/event-stream"
